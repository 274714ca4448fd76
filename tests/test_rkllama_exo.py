"""exo on an rkllama server: the engine driven the way exo's node drives it (tests/exo_driver.py),
its runtime built by the factory for RKLLM_BACKEND=rkllama, against the fake server in every
API generation. What exo's API would stream and return must be the server's text, byte for byte."""
from __future__ import annotations

import asyncio
import statistics

import pytest

from exo_driver import ExoRing
from exo_rkllm.config import Config
from exo_rkllm.engine.inference_engine import RKLLMInferenceEngine
from exo_rkllm.errors import RKLLMError
from exo_rkllm.runtime.sim import SimTiming
from fake_rkllama.fixtures import *  # noqa: F401,F403
from support import DEMO_ID, DEMO_LAYERS, user

TEXTS = ["  Leading spaces, then 世界 and 🤖👩‍💻", "日本語のテキスト 🇫🇷 👍🏽", " café\t\tCJK：你好，世界！ done"]


@pytest.fixture
async def make_engine(demo_models_dir):
    engines: list[RKLLMInferenceEngine] = []

    def make(url: str, **cfg) -> RKLLMInferenceEngine:
        engine = RKLLMInferenceEngine(config=Config(backend="rkllama", server_url=url, models_dir=demo_models_dir,
                                                    **cfg))
        failures: list[tuple[str, RKLLMError]] = []
        engine.add_end_listener(lambda rid, ending: failures.append((rid, ending.error)))
        engine.failures = failures  # type: ignore[attr-defined]
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        await engine.shutdown()


def full_text(engine, answer) -> str:
    return engine.model_for(DEMO_ID).tokenizer.decode(answer.tokens, skip_special_tokens=True,
                                                      clean_up_tokenization_spaces=False)


async def test_streamed_and_full_text_are_the_servers(server, make_engine, api):
    engine = make_engine(server.url)
    ring = ExoRing([engine])
    for i, text in enumerate(TEXTS + [None, None]):
        prompt = f"[[sim:text={text}]]" if text else f"write something {i}"
        answer = await ring.complete(DEMO_ID, user(prompt), DEMO_LAYERS)
        sent = server.generations()[-1]
        if text:
            assert sent.text == text
        assert answer.streamed_text == sent.text, "streamed content"
        assert full_text(engine, answer) == sent.text, "non-streamed content"
        assert answer.finish_reason == "stop"
        assert "\ufffd" not in answer.streamed_text
    assert not ring.errors and not engine.failures
    caps = engine._scheduler.runtime.capabilities
    assert caps.backend == "rkllama" and not caps.token_input


async def test_the_server_applies_the_only_chat_template(server, make_engine, api):
    engine = make_engine(server.url)
    ring = ExoRing([engine])
    messages = [{"role": "system", "content": "Answer in French."}, {"role": "user", "content": "Bonjour 🤖"}]
    await ring.complete(DEMO_ID, messages, DEMO_LAYERS)
    rec = server.generations()[-1]
    sent = rec.body["messages"]
    assert all("<|im_start|>" not in m["content"] for m in sent), "exo's templated prompt must not be sent"
    assert rec.prompt.count("<|im_start|>assistant\n") == 1 and rec.prompt.endswith("<|im_start|>assistant\n")
    assert rec.prompt.count("<|im_start|>user\n") == 1 and "Bonjour 🤖<|im_end|>" in rec.prompt
    if api != "early":
        assert sent == messages


async def test_time_to_first_token_tracks_the_servers_first_chunk(make_server, make_engine):
    """Board-like pacing (prefill 40 ms + 8 ms/token, 125 ms/token): exo's first token follows the
    server's first chunk by a few milliseconds (the issue asks for under 50 ms)."""
    server = await make_server("ollama", SimTiming(0, 40, 8, 125))
    engine = make_engine(server.url)
    ring = ExoRing([engine])
    await ring.complete(DEMO_ID, user("warm up [[sim:tokens=2]]"), DEMO_LAYERS)
    gaps = []
    for i in range(3):
        answer = await ring.chat(DEMO_ID, user(f"question {i} [[sim:tokens=4]]"), DEMO_LAYERS)
        rec = server.generations()[-1]
        gaps.append(answer.first_chunk_at - rec.first_piece_at)
        await answer.finished.wait()
        assert answer.streamed_text == rec.text
    print(f"\nexo first token after the server's first chunk: median {statistics.median(gaps) * 1000:.1f} ms, "
          f"max {max(gaps) * 1000:.1f} ms")
    assert max(gaps) < 0.25  # generous: measured figures are in the report


async def test_a_failure_before_the_first_token_reaches_exo_and_the_next_works(server, make_engine):
    engine = make_engine(server.url)
    ring = ExoRing([engine])
    server.faults.http_error = (500, {"error": "worker exploded"})
    with pytest.raises(RKLLMError, match="worker exploded"):
        await ring.complete(DEMO_ID, user("hello"), DEMO_LAYERS)
    answer = await ring.complete(DEMO_ID, user("[[sim:text=fine 世界]]"), DEMO_LAYERS)
    assert answer.streamed_text == "fine 世界"


async def test_a_failure_mid_answer_ends_it_with_an_error_and_the_next_works(server, make_engine):
    engine = make_engine(server.url)
    ring = ExoRing([engine])
    server.faults.malformed_after = 3
    answer = await ring.complete(DEMO_ID, user("[[sim:text=one two three four five six seven]]"), DEMO_LAYERS)
    assert answer.streamed_text == server.generations()[-1].text[: len(answer.streamed_text)]
    (rid, exc), = engine.failures
    assert rid == answer.request_id and "malformed stream chunk" in str(exc)
    answer = await ring.complete(DEMO_ID, user("[[sim:text=fine 🤖]]"), DEMO_LAYERS)
    assert answer.streamed_text == "fine 🤖"


async def test_server_down_then_back(server, make_engine):
    engine = make_engine(server.url)
    ring = ExoRing([engine])
    await ring.complete(DEMO_ID, user("first"), DEMO_LAYERS)
    await server.down()
    with pytest.raises(RKLLMError, match=f"{server.url}.*not reachable"):
        await ring.complete(DEMO_ID, user("while down"), DEMO_LAYERS)
    await server.up()
    answer = await ring.complete(DEMO_ID, user("[[sim:text=back 🇫🇷]]"), DEMO_LAYERS)
    assert answer.streamed_text == "back 🇫🇷"


async def test_abandoned_request_is_cancelled_at_the_server(make_server, make_engine, api):
    server = await make_server(api, SimTiming(0, 0, 0, 5.0))
    engine = make_engine(server.url)
    ring = ExoRing([engine])
    answer = await ring.chat(DEMO_ID, user("[[sim:text=" + "long " * 80 + "]]"), DEMO_LAYERS)
    await asyncio.sleep(0.05)
    ring.abandon(answer.request_id)  # the HTTP client went away
    nxt = await ring.complete(DEMO_ID, user("[[sim:text=next 世界]]"), DEMO_LAYERS)
    assert nxt.streamed_text == "next 世界", "nothing of the abandoned answer may leak into the next"
    assert engine.active_requests() == []
    await ring.drain()


async def test_a_ring_of_two_with_the_request_on_the_other_node(make_server, make_engine):
    """exo's own flow on either node of a ring: the node that took the request runs it whole and asks
    its server once."""
    server = await make_server("ollama")
    engines = [make_engine(server.url), make_engine(server.url)]
    ring = ExoRing(engines)
    for api_node in (0, 1):
        answer = await ring.complete(DEMO_ID, user(f"[[sim:text=ring {api_node} 世界 🤖]]"), DEMO_LAYERS,
                                     api_node=api_node)
        assert answer.streamed_text == f"ring {api_node} 世界 🤖"
    assert len(server.generations()) == 2 and not ring.errors
    assert all(e._scheduler is not None for e in engines), "each API node ran its own request"
