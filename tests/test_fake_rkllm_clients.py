"""The fake runtime library driven exactly as real clients of the real runtime drive it.

Each client below declares its ctypes structs and fills them the way that client does (read from its
source, written here in our own code):
- rkllama 0.0.74 (runtime 1.3.0): `top_k` declared as a float in RKLLMParam (7.0 arrives as the int
  1088421888), n_keep=0, base_domain_id=1, embed_flash=1, CPU mask 0xF0, an RKLLMCallback with NULL tokenizer
  and embed callbacks, token input with no role, per-run sampling params and max_new_tokens, keep_history=0,
  and a prompt-cache file per chat session: saved after each run, loaded before the session's next message,
  the whole conversation sent again;
- rkllama of the early /generate era (0.0.4, runtime 1.1.4): empty img_start/img_end/img_content strings,
  token input with id 2 appended, a void callback;
- Rockchip's rkllm_server_demo/flask_server.py of 1.1.4, 1.2.0, 1.2.3 and 1.3.0: prompt (text) input, empty
  img_* strings up to 1.2.x, role "user" and enable_thinking from 1.2.1, the 1.3.0 callback struct.
The fake must accept all of it (the real runtime does: these clients ship and work on boards), and its
prompt caches must restore the state they saved.
"""
from __future__ import annotations

import ctypes
import struct
from ctypes import (CFUNCTYPE, POINTER, Structure, Union, byref, c_bool, c_char_p, c_float, c_int, c_int8, c_int32,
                    c_size_t, c_uint8, c_uint32, c_void_p, pointer)
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import pytest

from fake_rkllm.fixtures import *  # noqa: F401,F403
from native_support import MULTIBYTE, VERSIONS, fake_model, prompt_ids, trace

LAYOUT = {"1.1.4": 114, "1.2.0": 120, "1.2.3": 121, "1.3.0": 130}
NORMAL, WAITING, FINISH, ERROR = 0, 1, 2, 3
INPUT_PROMPT, INPUT_TOKEN = 0, 1
# rkllama's own text template for prompt input (also Rockchip's demos up to 1.1.4)
PREFIX = "<|im_start|>system You are a helpful assistant. <|im_end|> <|im_start|>user"
POSTFIX = "<|im_end|><|im_start|>assistant"


@dataclass
class Abi:
    """The structs a client declares for one runtime layout."""
    layout: int
    Param: type
    Input: type
    Infer: type
    Result: type
    PromptCache: type
    Sampling: type | None
    Callbacks: type | None
    callback_type: Any


def declare(layout: int, float_top_k: bool = False) -> Abi:
    """ctypes declarations as the clients write them (float_top_k: rkllama since January 2026)."""
    extend: list[tuple[str, Any]] = [("base_domain_id", c_int32)]
    if layout >= 120:
        extend += [("embed_flash", c_int8), ("enabled_cpus_num", c_int8), ("enabled_cpus_mask", c_uint32)]
    if layout >= 121:
        extend += [("n_batch", c_uint8), ("use_cross_attn", c_int8), ("reserved", c_uint8 * 104)]
    else:
        extend += [("reserved", c_uint8 * (106 if layout == 120 else 112))]
    Extend = type("RKLLMExtendParam", (Structure,), {"_fields_": extend})

    param: list[tuple[str, Any]] = [("model_path", c_char_p), ("max_context_len", c_int32),
                                    ("max_new_tokens", c_int32), ("top_k", c_float if float_top_k else c_int32)]
    if layout >= 120:
        param.append(("n_keep", c_int32))
    param += [(name, c_float) for name in ("top_p", "temperature", "repeat_penalty", "frequency_penalty",
                                           "presence_penalty")]
    param += [("mirostat", c_int32), ("mirostat_tau", c_float), ("mirostat_eta", c_float),
              ("skip_special_token", c_bool)]
    if layout >= 130:
        param.append(("ignore_eos_token", c_bool))
    param.append(("is_async", c_bool))
    if layout < 130:
        param += [("img_start", c_char_p), ("img_end", c_char_p), ("img_content", c_char_p)]
    param.append(("extend_param", Extend))
    Param = type("RKLLMParam", (Structure,), {"_fields_": param})

    TokenInput = type("RKLLMTokenInput", (Structure,), {"_fields_": [("input_ids", POINTER(c_int32)),
                                                                     ("n_tokens", c_size_t)]})
    Data = type("RKLLMInputUnion", (Union,), {"_fields_": [("prompt_input", c_char_p), ("token_input", TokenInput),
                                                          ("_room", c_size_t * 20)]})
    head: list[tuple[str, Any]] = [("role", c_char_p), ("enable_thinking", c_bool)] if layout >= 121 else []
    Input = type("RKLLMInput", (Structure,), {"_fields_": head + [("input_type", c_int), ("input_data", Data)]})

    PromptCache = type("RKLLMPromptCacheParam", (Structure,), {"_fields_": [("save_prompt_cache", c_int),
                                                                           ("prompt_cache_path", c_char_p)]})
    Sampling = None
    infer: list[tuple[str, Any]] = [("mode", c_int), ("lora_params", c_void_p),
                                    ("prompt_cache_params", POINTER(PromptCache))]
    if layout >= 130:
        Sampling = type("RKLLMSamplingParam", (Structure,), {"_fields_": [
            ("top_k", c_int32), ("top_p", c_float), ("temperature", c_float), ("repeat_penalty", c_float),
            ("frequency_penalty", c_float), ("presence_penalty", c_float), ("mirostat", c_int32),
            ("mirostat_tau", c_float), ("mirostat_eta", c_float)]})
        infer.append(("sampling_params", POINTER(Sampling)))
    if layout >= 120:
        infer.append(("keep_history", c_int))
    if layout >= 130:
        infer.append(("max_new_tokens", c_int32))
    Infer = type("RKLLMInferParam", (Structure,), {"_fields_": infer})

    triple = [("ptr", c_void_p), ("a", c_int), ("b", c_int)]
    result: list[tuple[str, Any]] = [("text", c_char_p), ("token_id", c_int),
                                     ("last_hidden_layer", type("Hidden", (Structure,), {"_fields_": triple}))]
    if layout >= 120:
        result.append(("logits", type("Logits", (Structure,), {"_fields_": triple})))
    if layout >= 121:
        result.append(("perf", type("Perf", (Structure,), {"_fields_": [
            ("prefill_time_ms", c_float), ("prefill_tokens", c_int), ("generate_time_ms", c_float),
            ("generate_tokens", c_int), ("memory_usage_mb", c_float)]})))
    Result = type("RKLLMResult", (Structure,), {"_fields_": result})
    callback_type = CFUNCTYPE(c_int if layout >= 121 else None, POINTER(Result), c_void_p, c_int)
    Callbacks = None
    if layout >= 130:
        Callbacks = type("RKLLMCallback", (Structure,), {"_fields_": [
            ("result_callback", callback_type), ("result_userdata", c_void_p),
            ("tokenizer_callback", CFUNCTYPE(c_int, c_void_p, c_char_p, c_int32, POINTER(c_int32), c_int32)),
            ("tokenizer_userdata", c_void_p),
            ("embed_callback", CFUNCTYPE(c_int, c_void_p, POINTER(c_int32), ctypes.c_uint64, c_void_p,
                                         ctypes.c_uint64)),
            ("embed_userdata", c_void_p)]})
    return Abi(layout, Param, Input, Infer, Result, PromptCache, Sampling, Callbacks, callback_type)


@dataclass
class Client:
    """One loaded model, driven through a client's own declarations."""
    lib: Any
    abi: Abi
    handle: c_void_p = field(default_factory=c_void_p)
    pieces: list[bytes] = field(default_factory=list)
    states: list[int] = field(default_factory=list)
    prefill_tokens: int = -1
    hidden: list[tuple[int, int, float]] = field(default_factory=list)  # (num_tokens, embd_size, last value)
    _keep: list[Any] = field(default_factory=list)

    def on_result(self, result: Any, userdata: Any, state: int) -> int:
        self.states.append(state)
        layer = result.contents.last_hidden_layer
        if layer.ptr and layer.a > 0 and layer.b > 0:
            floats = ctypes.cast(layer.ptr, POINTER(c_float))
            self.hidden.append((layer.b, layer.a, floats[layer.a * layer.b - 1]))
        if state in (NORMAL, WAITING) and result.contents.text:
            self.pieces.append(result.contents.text)
        if state == FINISH and self.abi.layout >= 121:
            self.prefill_tokens = result.contents.perf.prefill_tokens
        return 0

    def init(self, param: Any) -> int:
        callback = self.abi.callback_type(self.on_result)
        self._keep += [param, callback]
        self.lib.rkllm_init.restype = c_int
        if self.abi.Callbacks is None:
            self.lib.rkllm_init.argtypes = [POINTER(c_void_p), POINTER(self.abi.Param), self.abi.callback_type]
            return self.lib.rkllm_init(byref(self.handle), byref(param), callback)
        callbacks = self.abi.Callbacks()
        callbacks.result_callback = callback  # tokenizer and embed callbacks stay NULL, as rkllama leaves them
        self._keep.append(callbacks)
        self.lib.rkllm_init.argtypes = [POINTER(c_void_p), POINTER(self.abi.Param), POINTER(self.abi.Callbacks)]
        return self.lib.rkllm_init(byref(self.handle), byref(param), byref(callbacks))

    def run(self, inp: Any, infer: Any) -> tuple[int, str]:
        self.pieces, self.states = [], []
        self.lib.rkllm_run.argtypes = [c_void_p, POINTER(self.abi.Input), POINTER(self.abi.Infer), c_void_p]
        self.lib.rkllm_run.restype = c_int
        rc = self.lib.rkllm_run(self.handle, byref(inp), byref(infer), None)
        return rc, b"".join(self.pieces).decode("utf-8")

    def load_prompt_cache(self, path: Path) -> int:
        self.lib.rkllm_load_prompt_cache.argtypes = [c_void_p, c_char_p]
        self.lib.rkllm_load_prompt_cache.restype = c_int
        return self.lib.rkllm_load_prompt_cache(self.handle, str(path).encode())

    def kv_cache_size(self) -> int:
        size = (c_int * 4)()
        self.lib.rkllm_get_kv_cache_size.argtypes = [c_void_p, POINTER(c_int)]
        assert self.lib.rkllm_get_kv_cache_size(self.handle, size) == 0
        return size[0]

    def destroy(self) -> None:
        self.lib.rkllm_destroy.argtypes = [c_void_p]
        self.lib.rkllm_destroy(self.handle)


def connect(fake_lib: Callable[..., Path], version: str, float_top_k: bool = False) -> Client:
    return Client(ctypes.CDLL(str(fake_lib(version))), declare(LAYOUT[version], float_top_k))


def token_input(abi: Abi, ids: list[int], role: bytes | None = None) -> Any:
    inp = abi.Input()
    if role is not None:
        inp.role = role
    inp.input_type = INPUT_TOKEN
    array = (c_int32 * len(ids))(*ids)
    inp.input_data.token_input.input_ids = ctypes.cast(array, POINTER(c_int32))
    inp.input_data.token_input.n_tokens = len(ids)
    inp._array = array  # keep the ids alive as long as the input
    return inp


def text_input(abi: Abi, text: str, role: bytes | None = None) -> Any:
    inp = abi.Input()
    if abi.layout >= 121:
        inp.role = role or b"user"
        inp.enable_thinking = False
    inp.input_type = INPUT_PROMPT
    inp.input_data.prompt_input = text.encode()
    return inp


def cache_params(abi: Abi, path: Path) -> Any:
    params = abi.PromptCache()
    params.save_prompt_cache = 1
    params.prompt_cache_path = str(path).encode()
    return params


# -- the clients ----------------------------------------------------------------------------------
def rkllama_new_param(abi: Abi, model: Path) -> Any:
    """rkllama 0.0.74's RKLLM.__init__ with its default options."""
    p = abi.Param()
    p.model_path = str(model).encode()
    p.max_context_len, p.max_new_tokens = 4096, 1024
    p.top_k = 7.0  # a float field in rkllama's struct: the runtime reads its bits as an int
    p.top_p, p.temperature, p.repeat_penalty = 0.9, 0.8, 1.1
    p.frequency_penalty, p.presence_penalty = 0.0, 0.0
    p.mirostat, p.mirostat_tau, p.mirostat_eta = 0, 5.0, 0.1
    p.skip_special_token, p.n_keep, p.is_async, p.ignore_eos_token = True, 0, False, False
    e = p.extend_param
    e.base_domain_id, e.embed_flash, e.n_batch, e.use_cross_attn = 1, 1, 1, 0
    e.enabled_cpus_num, e.enabled_cpus_mask = 4, (1 << 4) | (1 << 5) | (1 << 6) | (1 << 7)
    return p


def rkllama_new_infer(abi: Abi, save_to: Path) -> Any:
    """rkllama 0.0.74's per-run infer params: sampling and max_new_tokens per run, a prompt cache to save."""
    infer = abi.Infer()
    ctypes.memset(byref(infer), 0, ctypes.sizeof(infer))
    sampling = abi.Sampling()
    sampling.top_k, sampling.top_p, sampling.temperature, sampling.repeat_penalty = 7, 0.9, 0.8, 1.1
    sampling.mirostat_tau, sampling.mirostat_eta = 5.0, 0.1
    infer.sampling_params = pointer(sampling)
    infer.keep_history, infer.max_new_tokens = 0, 1024
    infer.prompt_cache_params = pointer(cache_params(abi, save_to))
    return infer


def legacy_param(abi: Abi, model: Path, max_context_len: int, max_new_tokens: int = -1) -> Any:
    """What early rkllama and Rockchip's flask demos (1.1.4-1.3.0) set: top_k=1, empty img_* strings."""
    p = abi.Param()
    p.model_path = str(model).encode()
    p.max_context_len, p.max_new_tokens, p.skip_special_token = max_context_len, max_new_tokens, True
    p.top_k, p.top_p, p.temperature, p.repeat_penalty = 1, 0.9, 0.8, 1.1
    p.frequency_penalty, p.presence_penalty, p.mirostat, p.mirostat_tau, p.mirostat_eta = 0.0, 0.0, 0, 5.0, 0.1
    p.is_async = False
    if abi.layout < 130:
        p.img_start, p.img_end, p.img_content = b"", b"", b""
    else:
        p.ignore_eos_token = False
    if abi.layout >= 120:
        p.n_keep = -1
        p.extend_param.enabled_cpus_num, p.extend_param.enabled_cpus_mask = 4, 0xF0
    if abi.layout >= 121:
        p.extend_param.embed_flash, p.extend_param.n_batch, p.extend_param.use_cross_attn = 1, 1, 0
    return p


def blank_infer(abi: Abi) -> Any:
    infer = abi.Infer()
    ctypes.memset(byref(infer), 0, ctypes.sizeof(infer))
    return infer


def answer_model(tmp_path: Path, tok: Any, version: str, **settings: Any) -> Path:
    return fake_model(tmp_path, tok, version, answers=(MULTIBYTE,), **settings)


# -- tests ----------------------------------------------------------------------------------------
def test_rkllama_new_loads_with_float_top_k_and_reuses_its_session_cache(fake_lib, tmp_path, demo_tokenizer,
                                                                         capfd) -> None:
    """rkllama 0.0.74 on 1.3.0: loads (float top_k said on stderr, not refused), answers, saves the session's
    prompt cache; the next message loads it and only the new part of the conversation is prefilled."""
    tok = demo_tokenizer
    client = connect(fake_lib, "1.3.0", float_top_k=True)
    assert ctypes.sizeof(client.abi.Param) == ctypes.sizeof(declare(130).Param)  # same layout, other type
    assert struct.unpack("<i", struct.pack("<f", 7.0))[0] == 1088421888
    model = answer_model(tmp_path, tok, "1.3.0")
    assert client.init(rkllama_new_param(client.abi, model)) == 0
    assert "top_k 1088421888" in capfd.readouterr().err

    first = [{"role": "user", "content": "Hello"}]
    ids = tok.encode(tok.apply_chat_template(first, tokenize=False, add_generation_prompt=True))
    cache = tmp_path / "cache" / "session_003"
    cache.parent.mkdir()
    rc, text = client.run(token_input(client.abi, ids), rkllama_new_infer(client.abi, cache))
    assert (rc, text) == (0, MULTIBYTE) and client.states[-1] == FINISH
    assert cache.is_file() and client.prefill_tokens == len(ids)
    client.lib.rkllm_clear_kv_cache.argtypes = [c_void_p, c_int, c_void_p, c_void_p]
    assert client.lib.rkllm_clear_kv_cache(client.handle, 1, None, None) == 0

    conversation = first + [{"role": "assistant", "content": text}, {"role": "user", "content": "More?"}]
    full = tok.encode(tok.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True))
    assert full[:len(ids)] == ids
    assert client.load_prompt_cache(cache) == 0
    rc, again = client.run(token_input(client.abi, full), rkllama_new_infer(client.abi, tmp_path / "cache" / "s5"))
    assert (rc, again) == (0, MULTIBYTE)
    assert client.prefill_tokens == len(full) - len(ids)  # the cached prompt was not prefilled again
    assert f"prompt_cache reuse n={len(ids)}" in trace(tmp_path)
    client.destroy()


def test_rkllama_early_era_with_empty_img_strings(fake_lib, tmp_path, demo_tokenizer) -> None:
    """rkllama 0.0.4 on 1.1.4: empty img_* strings, token input with id 2 appended, void callback."""
    client = connect(fake_lib, "1.1.4")
    assert client.init(legacy_param(client.abi, answer_model(tmp_path, demo_tokenizer, "1.1.4"), 1024)) == 0
    ids = prompt_ids(demo_tokenizer, "Hello") + [2]
    rc, text = client.run(token_input(client.abi, ids), blank_infer(client.abi))
    assert (rc, text) == (0, MULTIBYTE) and client.states[-1] == FINISH
    client.destroy()


@pytest.mark.parametrize("version", VERSIONS)
def test_rockchip_flask_demo_prompt_input(fake_lib, tmp_path, demo_tokenizer, version) -> None:
    """flask_server.py of each release: text input (with the template the 1.1.4 demo adds itself), role "user"
    from 1.2.1; empty img_* strings up to 1.2.x. The same conversation gets the same answer each time."""
    client = connect(fake_lib, version)
    model = answer_model(tmp_path, demo_tokenizer, version)
    assert client.init(legacy_param(client.abi, model, 512 if version == "1.1.4" else 4096)) == 0
    prompt = PREFIX + "Hello" + POSTFIX if version == "1.1.4" else "Hello"
    infer = blank_infer(client.abi)
    for _ in range(2):
        rc, text = client.run(text_input(client.abi, prompt), infer)
        assert (rc, text) == (0, MULTIBYTE) and client.states[-1] == FINISH
    run = [line for line in trace(tmp_path) if line.startswith("run ")][-1]
    assert run == f"run keep=0 n={(len(prompt.encode()) + 3) // 4} kv_before=0"
    client.destroy()


@pytest.mark.parametrize("num_predict", [-2, -1, 0, 5])
def test_rkllama_new_passes_ollamas_num_predict_as_max_new_tokens(fake_lib, tmp_path, demo_tokenizer,
                                                                 num_predict) -> None:
    """rkllama maps Ollama's num_predict (-1 endless, -2 fill the context) to RKLLMInferParam.max_new_tokens;
    rkllm.h 1.3.0: "<=0 to use the init value"."""
    client = connect(fake_lib, "1.3.0", float_top_k=True)
    assert client.init(rkllama_new_param(client.abi, answer_model(tmp_path, demo_tokenizer, "1.3.0"))) == 0
    infer = rkllama_new_infer(client.abi, tmp_path / "c")
    infer.max_new_tokens = num_predict
    rc, text = client.run(token_input(client.abi, prompt_ids(demo_tokenizer, "Hello")), infer)
    assert rc == 0 and client.states[-1] == FINISH
    if num_predict > 0:
        assert len(client.states) - 1 == num_predict and MULTIBYTE.startswith(text)
    else:
        assert text == MULTIBYTE
    client.destroy()


def test_rkllama_new_embeddings_through_the_last_hidden_layer(fake_lib, tmp_path, demo_tokenizer) -> None:
    """rkllama 0.0.74's /api/embed: RKLLM_INFER_GET_LAST_HIDDEN_LAYER on prompt input; it reads the last
    token's row of num_tokens x embd_size floats during a NORMAL callback."""
    client = connect(fake_lib, "1.3.0", float_top_k=True)
    assert client.init(rkllama_new_param(client.abi, answer_model(tmp_path, demo_tokenizer, "1.3.0"))) == 0
    infer = blank_infer(client.abi)
    infer.mode = 1
    inp = client.abi.Input()
    inp.input_type, inp.input_data.prompt_input = INPUT_PROMPT, b"Hello NPU"
    assert client.run(inp, infer) == (0, "")
    assert client.states == [NORMAL, FINISH]
    [(n, embd, last)] = client.hidden
    assert (n, embd) == (3, 1536) and -1.0 <= last < 1.0
    client.run(inp, infer)
    assert client.hidden[1] == client.hidden[0]  # the same text, the same embedding
    client.destroy()


@pytest.mark.parametrize("version", ["1.2.0", "1.2.3"])
def test_rkllama_2025_cpu_settings_from_cpu_count(fake_lib, tmp_path, demo_tokenizer, capfd, version) -> None:
    """rkllama of May-Sept 2025 (1.2.x): enabled_cpus_num = multiprocessing.cpu_count(), enabled_cpus_mask =
    (1 << (n + 1)) - 1, i.e. 8 and 0x1FF on an RK3588 (a developer machine has more cores still). It works on
    boards, so the fake narrows it to its 8 cores and says so."""
    client = connect(fake_lib, version)
    param = legacy_param(client.abi, answer_model(tmp_path, demo_tokenizer, version), 2048)
    param.extend_param.enabled_cpus_num = 8
    param.extend_param.enabled_cpus_mask = (1 << 9) - 1
    assert client.init(param) == 0
    assert "enabled_cpus_mask 0x1ff" in capfd.readouterr().err
    assert trace(tmp_path)[0].endswith(" cpus=8 mask=0xff")
    rc, text = client.run(token_input(client.abi, prompt_ids(demo_tokenizer, "Hello"),
                                      b"user" if version == "1.2.3" else None), blank_infer(client.abi))
    assert (rc, text) == (0, MULTIBYTE)
    client.destroy()
    client = connect(fake_lib, version)
    param = legacy_param(client.abi, answer_model(tmp_path, demo_tokenizer, version), 2048)
    param.extend_param.enabled_cpus_num, param.extend_param.enabled_cpus_mask = 32, 0xFFFFFFFF  # a 32-core PC
    assert client.init(param) == 0
    assert "enabled_cpus_num 32" in capfd.readouterr().err
    client.destroy()


@pytest.mark.parametrize("top_k", [-5, 1 << 30])
def test_out_of_range_top_k_is_clamped_and_said(fake_lib, tmp_path, demo_tokenizer, capfd, top_k) -> None:
    client = connect(fake_lib, "1.2.3")
    param = legacy_param(client.abi, answer_model(tmp_path, demo_tokenizer, "1.2.3"), 4096)
    param.top_k = top_k
    assert client.init(param) == 0
    assert f"W rkllm: RKLLMParam top_k {top_k} is out of range" in capfd.readouterr().err
    assert " top_k=0 " in trace(tmp_path)[0]  # the whole vocabulary
    client.destroy()


# -- prompt caches ---------------------------------------------------------------------------------
def _first_turn(fake_lib, tmp_path, tok, version, cache: Path) -> list[int]:
    """A first conversation turn that saves its prompt cache to `cache`; returns its input ids."""
    client = connect(fake_lib, version)
    assert client.init(legacy_param(client.abi, answer_model(tmp_path, tok, version), 4096)) == 0
    ids = prompt_ids(tok, "Tell me about the NPU")
    infer = blank_infer(client.abi)
    infer.prompt_cache_params = pointer(cache_params(client.abi, cache))
    rc, text = client.run(token_input(client.abi, ids, b"user" if client.abi.layout >= 121 else None), infer)
    assert (rc, text) == (0, MULTIBYTE)
    client.destroy()
    return ids


@pytest.mark.parametrize("version", VERSIONS)
def test_prompt_cache_restores_the_prefill_state_in_a_new_handle(fake_lib, tmp_path, demo_tokenizer,
                                                                  version) -> None:
    """Saved after a run: the state after the input's prefill (not the answer). A new handle loading it holds
    that state; with keep_history the next run prefills only the new suffix; from an empty history (keep_history
    0, or 1.1.4) an input that starts with the cached prompt prefills only the rest."""
    tok = demo_tokenizer
    cache = tmp_path / "prompt.cache"
    ids = _first_turn(fake_lib, tmp_path, tok, version, cache)
    layout = LAYOUT[version]

    client = connect(fake_lib, version)
    assert client.init(legacy_param(client.abi, answer_model(tmp_path, tok, version), 4096)) == 0
    assert client.load_prompt_cache(cache) == 0
    if layout >= 121:
        assert client.kv_cache_size() == len(ids)
    suffix = tok.encode("<|im_end|>\n<|im_start|>user\nmore<|im_end|>\n<|im_start|>assistant\n")
    infer = blank_infer(client.abi)
    if layout >= 120:
        infer.keep_history = 1
        rc, text = client.run(token_input(client.abi, suffix, b"user" if layout >= 121 else None), infer)
        assert (rc, text) == (0, MULTIBYTE)
        assert trace(tmp_path)[-2] == f"run keep=1 n={len(suffix)} kv_before={len(ids)}"
        if layout >= 121:
            assert client.prefill_tokens == len(suffix)
        infer.keep_history = 0
    rc, text = client.run(token_input(client.abi, ids + suffix, b"user" if layout >= 121 else None), infer)
    assert rc == 0 and text == MULTIBYTE
    assert trace(tmp_path)[-3:-1] == [f"run keep=0 n={len(ids) + len(suffix)} kv_before=0",
                                      f"prompt_cache reuse n={len(ids)}"]
    if layout >= 121:
        assert client.prefill_tokens == len(suffix)
    # an input that does not start with the cache is prefilled in full
    rc, _ = client.run(token_input(client.abi, suffix + ids, b"user" if layout >= 121 else None), infer)
    assert rc == 0 and not trace(tmp_path)[-2].startswith("prompt_cache reuse")
    if layout >= 121:
        assert client.prefill_tokens == len(ids) + len(suffix)
    client.destroy()


def test_prompt_cache_refuses_missing_corrupt_and_foreign_files(fake_lib, tmp_path, demo_tokenizer,
                                                                capfd) -> None:
    tok = demo_tokenizer
    cache = tmp_path / "good.cache"
    _first_turn(fake_lib, tmp_path, tok, "1.2.3", cache)
    corrupt = tmp_path / "corrupt.cache"
    good = cache.read_text()
    first_id = good.split("\nids=")[1].split(",")[0]
    corrupt.write_text(good.replace(f"\nids={first_id},", f"\nids={int(first_id) + 1},"))
    truncated = tmp_path / "truncated.cache"
    truncated.write_text(cache.read_text().split("\nids=")[0] + "\n")
    other_model = tmp_path / "other"
    other_model.mkdir()
    other_cache = tmp_path / "other.cache"
    _first_turn(fake_lib, other_model, tok, "1.2.3", other_cache)
    other_release = tmp_path / "old.cache"
    (tmp_path / "old").mkdir()
    _first_turn(fake_lib, tmp_path / "old", tok, "1.1.4", other_release)
    not_a_cache = tmp_path / "model-file.cache"
    not_a_cache.write_text("hello\n")

    client = connect(fake_lib, "1.2.3")
    # other_model's model file names another trace file: other bytes, another model identity
    assert client.init(legacy_param(client.abi, answer_model(tmp_path, tok, "1.2.3"), 4096)) == 0
    capfd.readouterr()
    for path, why in [(tmp_path / "missing.cache", "failed to open prompt cache"),
                      (corrupt, "checksum mismatch"), (truncated, "truncated or corrupt"),
                      (other_cache, "saved with another model"), (other_release, "saved by another runtime release"),
                      (not_a_cache, "not a prompt cache file")]:
        assert client.load_prompt_cache(path) == -1, path
        assert why in capfd.readouterr().err, path
    assert client.kv_cache_size() == 0
    assert client.load_prompt_cache(cache) == 0
    client.destroy()


def test_a_run_that_cannot_save_its_cache_still_answers(fake_lib, tmp_path, demo_tokenizer, capfd) -> None:
    client = connect(fake_lib, "1.2.3")
    assert client.init(legacy_param(client.abi, answer_model(tmp_path, demo_tokenizer, "1.2.3"), 4096)) == 0
    infer = blank_infer(client.abi)
    infer.prompt_cache_params = pointer(cache_params(client.abi, tmp_path / "no" / "such" / "dir" / "c"))
    rc, text = client.run(token_input(client.abi, prompt_ids(demo_tokenizer, "hi"), b"user"), infer)
    assert (rc, text) == (0, MULTIBYTE)
    assert "failed to save the prompt cache" in capfd.readouterr().err
    client.destroy()


# -- the developer setup -----------------------------------------------------------------------------
def test_setup_writes_a_model_folder_exo_rkllm_and_both_rkllama_eras_accept(fake_lib, tmp_path) -> None:
    """`python -m tests.fake_rkllm setup`: rkllama 0.0.74 wants FROM and HUGGINGFACE_PATH in the Modelfile and
    reads the tokenizer from <model>/tokenizer/; the early era hands HUGGINGFACE_PATH to AutoTokenizer (a local
    folder works offline); exo-rkllm's catalog must list the folder as servable."""
    from transformers import AutoTokenizer

    from exo_rkllm.models.catalog import Catalog
    from exo_rkllm.config import Config
    from fake_rkllm.__main__ import main

    assert main(["setup", "--dir", str(tmp_path), "--version", "1.3.0"]) == 0
    folder = tmp_path / "models" / "Qwen2.5-1.5B-Instruct-Fake"
    rows = dict(line.split("=", 1) for line in (folder / "Modelfile").read_text().splitlines() if "=" in line)
    rows = {k: v.strip('"') for k, v in rows.items()}
    assert (folder / rows["FROM"]).is_file()
    assert Path(rows["HUGGINGFACE_PATH"]) == folder / "tokenizer"
    tok = AutoTokenizer.from_pretrained(rows["HUGGINGFACE_PATH"])
    assert tok.decode(tok.encode("你好 🤖")) == "你好 🤖"

    entries = Catalog(Config(models_dir=tmp_path / "models")).servable()
    assert [e.name for e in entries] == ["Qwen2.5-1.5B-Instruct-Fake"]

    client = connect(lambda version: tmp_path / "lib" / "librkllmrt.so", "1.3.0", float_top_k=True)
    assert client.init(rkllama_new_param(client.abi, folder / rows["FROM"])) == 0
    client.destroy()
