"""The stream parsers on recorded wire data: exo's SSE chunks, rkllama's NDJSON and early /generate
(the latter two read with exo-rkllm's own rkllama client parser, as the bench does).

The two exo streams were recorded from a real legacy exo running the rkllm engine
with the simulator (answers capped at 6 tokens); no network or clock is involved here.
"""
from __future__ import annotations

import json

import pytest

from exo_rkllm.bench.targets import ExoStreamAccumulator, RkllamaStreamAccumulator, parse_sse_line
from exo_rkllm.errors import GenerationError
from exo_rkllm.runtime.rkllama.client import API_EARLY, API_OLLAMA, LineParser, parse_chunk


def _chunk(rid: str, content: str, finish: str | None) -> str:
    body = {"id": f"chatcmpl-{rid}", "object": "chat.completion", "created": 1795371625,
            "model": "qwen2.5-1.5b-instruct-demo", "system_fingerprint": "exo_0.0.1",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "logprobs": None,
                         "finish_reason": finish, "delta": {"role": "assistant", "content": content}}]}
    return "data: " + json.dumps(body) + "\n\n"


RID = "569c2678-0d7c-4839-a79d-e0ba654ee5ba"
# 6 tokens, the cap cut the last character in half: the engine's EOS chunk carries its U+FFFD.
EXO_CUT = "".join(_chunk(RID, c, f) for c, f in [("Math", None), (":", None), ("", None), (" \u2211", None),
                                                 (" x", None), ("", None), ("\ufffd", "stop")]).encode()
# 6 tokens and an empty EOS chunk.
EXO_CLEAN = "".join(_chunk("ecede466", c, f) for c, f in [("Gr", None), ("\u00f6\u00dfe", None), (",", None),
                                                          (" Stra", None), ("\u00dfe", None), (" und", None),
                                                          ("", "stop")]).encode()


def replay_exo(raw: bytes, stop_texts=frozenset({"<|im_end|>"})):
    acc = ExoStreamAccumulator(t_start=100.0, stop_texts=frozenset(stop_texts))
    t = 100.0
    for line in raw.split(b"\n"):
        chunk = parse_sse_line(line)
        if isinstance(chunk, dict):
            t += 0.125
            acc.feed(t, chunk)
    return acc, acc.finish(t + 0.01)


def test_parse_sse_line():
    assert parse_sse_line(b'data: {"a": 1}\n') == {"a": 1}
    assert parse_sse_line("data: [DONE]") == "[DONE]"
    assert parse_sse_line(b"") is None
    assert parse_sse_line(b": keep-alive") is None
    assert parse_sse_line(b"data: not json") is None


def test_exo_stream_with_cut_character_counts_six_tokens():
    acc, res = replay_exo(EXO_CUT)
    assert acc.request_id == RID
    assert res.chunks == 7
    assert len(res.token_times) == 6  # the EOS chunk is not a token
    assert res.content_chunks == 5  # "Math", ":", " ∑", " x", and the flushed U+FFFD
    assert res.text == "Math: \u2211 x\ufffd"
    assert res.finish_reason == "stop"
    assert res.t_first == pytest.approx(100.125)
    assert res.server["system_fingerprint"] == "exo_0.0.1"
    assert res.server["token_chunks"] == 6
    assert any("U+FFFD" in n for n in res.notes)
    # first token at 100.125, sixth at 100.75: 5 intervals in 0.625 s
    from exo_rkllm.bench.metrics import decode_rate
    assert decode_rate(res.token_times) == pytest.approx(8.0)


def test_exo_stream_clean_end():
    _, res = replay_exo(EXO_CLEAN)
    assert res.text == "Gr\u00f6\u00dfe, Stra\u00dfe und"
    assert len(res.token_times) == 6 and res.content_chunks == 6 and res.chunks == 7
    assert "eos_text_echoed" not in res.server


def test_plain_exo_echoes_the_eos_marker_which_is_dropped():
    raw = (_chunk("x", "Hi", None) + _chunk("x", "!", None) + _chunk("x", "<|im_end|>", "stop")).encode()
    _, res = replay_exo(raw)
    assert res.text == "Hi!"
    assert len(res.token_times) == 2
    assert res.server["eos_text_echoed"] is True
    assert res.stripped == ["<|im_end|>"]  # kept for the integrity check: a client saw that text


def test_length_finish_keeps_the_last_token():
    raw = (_chunk("x", "a", None) + _chunk("x", "b", "length")).encode()
    _, res = replay_exo(raw)
    assert res.text == "ab" and len(res.token_times) == 2 and res.finish_reason == "length"


def replay_rkllama(api: str, objects: list[tuple[float, dict]], t_end: float, *, eof: bool = False):
    """Feed wire objects through the client's parser, as RkllamaTarget.chat does."""
    acc = RkllamaStreamAccumulator(t_start=0.0)
    parser = LineParser()
    sep = b"\n\n" if api == API_EARLY else b"\n"
    for t, obj in objects:
        for line in parser.lines(json.dumps(obj).encode() + sep):
            acc.feed(t, parse_chunk(api, parser.parse(line)))
    return acc.finish(t_end, ended_cleanly=eof)


def test_rkllama_ollama_chat_stream():
    pieces = ["The", " NPU", " has", " three", " cores", "."]
    objs = [(0.3 + 0.1 * i, {"model": "qwen2.5:3b", "message": {"role": "assistant", "content": p}, "done": False})
            for i, p in enumerate(pieces)]
    objs.append((0.9, {"model": "qwen2.5:3b", "message": {"role": "assistant", "content": ""}, "done": True,
                       "done_reason": "stop", "prompt_eval_count": 20, "prompt_eval_duration": 200_000_000,
                       "eval_count": 6, "eval_duration": 600_000_000, "total_duration": 900_000_000}))
    res = replay_rkllama(API_OLLAMA, objs, 0.95)
    assert res.text == "The NPU has three cores."
    assert len(res.token_times) == 6
    assert res.finish_reason == "stop"
    assert res.prefill_tokens == 20
    assert res.server["server_tokens_per_s"] == pytest.approx(10.0)
    assert res.t_first == pytest.approx(0.3)


def _early(p: str, fin: str | None, usage: dict | None = None) -> dict:
    obj = {"id": "rkllm_chat", "object": "rkllm_chat", "created": 1,
           "choices": [{"role": "assistant", "content": p, "logprobs": None, "finish_reason": fin}]}
    if usage is not None:
        obj["usage"] = usage
    return obj


def test_rkllama_early_generate_stream_without_a_closing_object():
    # real early rkllama: finish_reason null throughout, usage.prompt_tokens null, the stream just ends
    usage = {"prompt_tokens": None, "completion_tokens": None, "tokens_per_second": None, "total_tokens": None}
    res = replay_rkllama(API_EARLY, [(0.1 * (i + 1), _early(p, None, usage)) for i, p in enumerate("423")], 0.5,
                         eof=True)
    assert res.text == "423" and len(res.token_times) == 3 and res.finish_reason == "stop"
    assert res.prefill_tokens is None  # the early API does not say what it prefilled


def test_rkllama_early_generate_stream_with_a_closing_object():
    objs = [(0.1 * (i + 1), _early(p, None)) for i, p in enumerate("423")]
    objs.append((0.5, _early("", "stop", {"prompt_tokens": 27, "completion_tokens": 3, "tokens_per_second": 8.1,
                                          "total_tokens": 30})))
    res = replay_rkllama(API_EARLY, objs, 0.5)
    assert res.text == "423" and len(res.token_times) == 3 and res.finish_reason == "stop"
    assert res.prefill_tokens == 27 and res.server["eval_count"] == 3


def test_rkllama_error_object_raises():
    with pytest.raises(GenerationError, match="model not loaded"):
        replay_rkllama(API_OLLAMA, [(0.1, {"error": "model not loaded"})], 0.2)
