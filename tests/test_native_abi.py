"""Struct sizes and every field offset of the ctypes binding, for every supported runtime layout,
against the figures of the real rkllm.h headers (the table below: computed by a C++ compiler
on LP64 Linux from airockchip/rknn-llm at each release tag). The fake runtime library is held to
the same table: a fake with a wrong layout would prove nothing about the binding."""
from __future__ import annotations

import ctypes

import pytest

from exo_rkllm.runtime.native import abi
from fake_rkllm.fixtures import *  # noqa: F401,F403 - the fake_lib fixture

# struct -> (size, alignment, [(field, offset), ...] in declaration order). "(union)" is the
# anonymous union of RKLLMInput (our field "u").
_COMMON = {
    "RKLLMLoraAdapter": (24, 8, [("lora_adapter_path", 0), ("lora_adapter_name", 8), ("scale", 16)]),
    "RKLLMEmbedInput": (16, 8, [("embed", 0), ("n_tokens", 8)]),
    "RKLLMTokenInput": (16, 8, [("input_ids", 0), ("n_tokens", 8)]),
    "RKLLMLoraParam": (8, 8, [("lora_adapter_name", 0)]),
    "RKLLMPromptCacheParam": (16, 8, [("save_prompt_cache", 0), ("prompt_cache_path", 8)]),
    "RKLLMResultLastHiddenLayer": (16, 8, [("hidden_states", 0), ("embd_size", 8), ("num_tokens", 12)]),
}
_LOGITS = {"RKLLMResultLogits": (16, 8, [("logits", 0), ("vocab_size", 8), ("num_tokens", 12)])}
_PERF = {"RKLLMPerfStat": (20, 4, [("prefill_time_ms", 0), ("prefill_tokens", 4), ("generate_time_ms", 8),
                                   ("generate_tokens", 12), ("memory_usage_mb", 16)])}
_CROSS = {"RKLLMCrossAttnParam": (40, 8, [("encoder_k_cache", 0), ("encoder_v_cache", 8), ("encoder_mask", 16),
                                          ("encoder_pos", 24), ("num_tokens", 32)])}
_SAMPLING_FIELDS = [("top_p", 24), ("temperature", 28), ("repeat_penalty", 32), ("frequency_penalty", 36),
                    ("presence_penalty", 40), ("mirostat", 44), ("mirostat_tau", 48), ("mirostat_eta", 52)]

TABLE: dict[str, dict[str, tuple[int, int, list[tuple[str, int]]]]] = {
    "1.1.4": {
        **_COMMON,
        "RKLLMExtendParam": (116, 4, [("base_domain_id", 0), ("reserved", 4)]),
        "RKLLMParam": (200, 8, [
            ("model_path", 0), ("max_context_len", 8), ("max_new_tokens", 12), ("top_k", 16), ("top_p", 20),
            ("temperature", 24), ("repeat_penalty", 28), ("frequency_penalty", 32), ("presence_penalty", 36),
            ("mirostat", 40), ("mirostat_tau", 44), ("mirostat_eta", 48), ("skip_special_token", 52),
            ("is_async", 53), ("img_start", 56), ("img_end", 64), ("img_content", 72), ("extend_param", 80)]),
        "RKLLMMultiModelInput": (24, 8, [("prompt", 0), ("image_embed", 8), ("n_image_tokens", 16)]),
        "RKLLMInput": (32, 8, [("input_type", 0), ("(union)", 8)]),
        "RKLLMInferParam": (24, 8, [("mode", 0), ("lora_params", 8), ("prompt_cache_params", 16)]),
        "RKLLMResult": (32, 8, [("text", 0), ("token_id", 8), ("last_hidden_layer", 16)]),
    },
    "1.2.0": {
        **_COMMON, **_LOGITS,
        "RKLLMExtendParam": (120, 4, [("base_domain_id", 0), ("embed_flash", 4), ("enabled_cpus_num", 5),
                                      ("enabled_cpus_mask", 8), ("reserved", 12)]),
        "RKLLMParam": (208, 8, [
            ("model_path", 0), ("max_context_len", 8), ("max_new_tokens", 12), ("top_k", 16), ("n_keep", 20),
            *_SAMPLING_FIELDS, ("skip_special_token", 56), ("is_async", 57), ("img_start", 64), ("img_end", 72),
            ("img_content", 80), ("extend_param", 88)]),
        "RKLLMMultiModelInput": (24, 8, [("prompt", 0), ("image_embed", 8), ("n_image_tokens", 16)]),
        "RKLLMInput": (32, 8, [("input_type", 0), ("(union)", 8)]),
        "RKLLMInferParam": (32, 8, [("mode", 0), ("lora_params", 8), ("prompt_cache_params", 16),
                                    ("keep_history", 24)]),
        "RKLLMResult": (48, 8, [("text", 0), ("token_id", 8), ("last_hidden_layer", 16), ("logits", 32)]),
    },
    "1.2.1": {
        **_COMMON, **_LOGITS, **_PERF, **_CROSS,
        "RKLLMExtendParam": (120, 4, [("base_domain_id", 0), ("embed_flash", 4), ("enabled_cpus_num", 5),
                                      ("enabled_cpus_mask", 8), ("n_batch", 12), ("use_cross_attn", 13),
                                      ("reserved", 14)]),
        "RKLLMParam": (208, 8, [
            ("model_path", 0), ("max_context_len", 8), ("max_new_tokens", 12), ("top_k", 16), ("n_keep", 20),
            *_SAMPLING_FIELDS, ("skip_special_token", 56), ("is_async", 57), ("img_start", 64), ("img_end", 72),
            ("img_content", 80), ("extend_param", 88)]),
        "RKLLMMultiModelInput": (48, 8, [("prompt", 0), ("image_embed", 8), ("n_image_tokens", 16), ("n_image", 24),
                                         ("image_width", 32), ("image_height", 40)]),
        "RKLLMInput": (64, 8, [("role", 0), ("enable_thinking", 8), ("input_type", 12), ("(union)", 16)]),
        "RKLLMInferParam": (32, 8, [("mode", 0), ("lora_params", 8), ("prompt_cache_params", 16),
                                    ("keep_history", 24)]),
        "RKLLMResult": (72, 8, [("text", 0), ("token_id", 8), ("last_hidden_layer", 16), ("logits", 32),
                                ("perf", 48)]),
    },
    "1.3.0": {
        **_COMMON, **_LOGITS, **_PERF, **_CROSS,
        "RKLLMExtendParam": (120, 4, [("base_domain_id", 0), ("embed_flash", 4), ("enabled_cpus_num", 5),
                                      ("enabled_cpus_mask", 8), ("n_batch", 12), ("use_cross_attn", 13),
                                      ("reserved", 14)]),
        "RKLLMParam": (184, 8, [
            ("model_path", 0), ("max_context_len", 8), ("max_new_tokens", 12), ("top_k", 16), ("n_keep", 20),
            *_SAMPLING_FIELDS, ("skip_special_token", 56), ("ignore_eos_token", 57), ("is_async", 58),
            ("extend_param", 60)]),
        "RKLLMMultiModalInput": (144, 8, [("prompt", 0), ("image", 8), ("video", 72)]),
        "RKLLMInput": (160, 8, [("role", 0), ("enable_thinking", 8), ("input_type", 12), ("(union)", 16)]),
        "RKLLMSamplingParam": (36, 4, [("top_k", 0), ("top_p", 4), ("temperature", 8), ("repeat_penalty", 12),
                                       ("frequency_penalty", 16), ("presence_penalty", 20), ("mirostat", 24),
                                       ("mirostat_tau", 28), ("mirostat_eta", 32)]),
        "RKLLMInferParam": (40, 8, [("mode", 0), ("lora_params", 8), ("prompt_cache_params", 16),
                                    ("sampling_params", 24), ("keep_history", 32), ("max_new_tokens", 36)]),
        "RKLLMResult": (72, 8, [("text", 0), ("token_id", 8), ("last_hidden_layer", 16), ("logits", 32),
                                ("perf", 48)]),
        "RKLLMCallback": (48, 8, [("result_callback", 0), ("result_userdata", 8), ("tokenizer_callback", 16),
                                  ("tokenizer_userdata", 24), ("embed_callback", 32), ("embed_userdata", 40)]),
    },
}

CASES = [(layout, name) for layout, structs in TABLE.items() for name in structs]


@pytest.mark.parametrize("layout,name", CASES, ids=[f"{layout}-{name}" for layout, name in CASES])
def test_struct_size_alignment_and_every_field_offset(layout: str, name: str) -> None:
    size, align, fields = TABLE[layout][name]
    struct = getattr(abi.LAYOUTS[layout], name)
    assert ctypes.sizeof(struct) == size, f"{layout} {name}: size"
    assert ctypes.alignment(struct) == align, f"{layout} {name}: alignment"
    declared = [f[0] for f in struct._fields_]
    expected = ["u" if f == "(union)" else f for f, _ in fields]
    assert declared == expected, f"{layout} {name}: fields and their order"
    for field, offset in fields:
        attr = "u" if field == "(union)" else field
        assert getattr(struct, attr).offset == offset, f"{layout} {name}.{field}"


@pytest.mark.parametrize("layout", sorted(TABLE))
def test_every_struct_of_the_header_is_in_the_table(layout: str) -> None:
    ns = abi.LAYOUTS[layout]
    structs = {n for n in dir(ns) if n.startswith("RKLLM") and isinstance(getattr(ns, n), type)
               and issubclass(getattr(ns, n), ctypes.Structure)}
    internal = {"RKLLMMultiModalImage", "RKLLMMultiModalVideo", "RKLLMMultiModalInput", "RKLLMMultiModelInput"}
    assert structs - internal <= set(TABLE[layout]), structs - internal - set(TABLE[layout])
    assert set(TABLE[layout]) - internal <= structs


@pytest.mark.parametrize("layout", sorted(TABLE))
def test_union_members_sit_at_the_union_offset(layout: str) -> None:
    ns = abi.LAYOUTS[layout]
    union_at = dict(TABLE[layout]["RKLLMInput"][2])["(union)"]
    for member in ("prompt_input", "embed_input", "token_input", "multimodal_input"):
        assert getattr(ns.RKLLMInput, member).offset == union_at


@pytest.mark.parametrize("layout", sorted(TABLE))
def test_callback_and_prototypes_follow_the_release(layout: str) -> None:
    ns = abi.LAYOUTS[layout]
    returns_int = ns.LLMResultCallback._restype_ is ctypes.c_int
    assert returns_int == (layout in ("1.2.1", "1.3.0"))  # void in 1.1.x / 1.2.0, int from 1.2.1
    names = [p[0] for p in ns.PROTOTYPES]
    assert ("rkllm_clear_kv_cache" in names) == (layout != "1.1.4")
    assert ("rkllm_set_chat_template" in names) == (layout != "1.1.4")
    assert ("rkllm_get_kv_cache_size" in names) == (layout in ("1.2.1", "1.3.0"))
    clear = dict((p[0], p[2]) for p in ns.PROTOTYPES).get("rkllm_clear_kv_cache")
    if clear is not None:
        assert len(clear) == (2 if layout == "1.2.0" else 4)
    init_args = dict((p[0], p[2]) for p in ns.PROTOTYPES)["rkllm_init"]
    assert (init_args[2] is ns.LLMResultCallback) == (layout != "1.3.0")
    assert ns.HAS_KEEP_HISTORY == (layout != "1.1.4")
    assert ns.HAS_PER_RUN_SAMPLING == ns.HAS_PER_RUN_MAX_NEW_TOKENS == (layout == "1.3.0")
    assert ns.HAS_PER_RUN_SAMPLING == hasattr(ns, "RKLLMSamplingParam")
    assert ns.HAS_LAST_HIDDEN_LAYER  # RKLLM_INFER_GET_LAST_HIDDEN_LAYER = 1 is in every release's rkllm.h


def _fake_figures(lib_path) -> dict[str, int]:
    lib = ctypes.CDLL(str(lib_path))
    lib.fake_rkllm_layout.restype = ctypes.c_char_p
    figures: dict[str, int] = {}
    for item in lib.fake_rkllm_layout().decode().strip(";").split(";"):
        key, _, value = item.partition("=")
        figures[key] = int(value)
    return figures


@pytest.mark.parametrize("version,layout", [("1.1.4", "1.1.4"), ("1.2.0", "1.2.0"), ("1.2.3", "1.2.1"),
                                           ("1.3.0", "1.3.0")])
def test_the_fake_runtime_has_the_real_layout(fake_lib, version: str, layout: str) -> None:
    figures = _fake_figures(fake_lib(version))
    table = TABLE[layout]
    multimodal = "RKLLMMultiModalInput" if layout == "1.3.0" else "RKLLMMultiModelInput"
    checked = 0
    for key, value in figures.items():
        struct, _, field = key.partition(".")
        name = multimodal if struct == "RKLLMMultiModalInput" else struct
        size, _, fields = table[name]
        if field == "size":
            assert value == size, key
        else:
            offsets = dict(fields)
            if field in ("token_input",):
                field = "(union)"
            assert value == offsets[field], key
        checked += 1
    assert checked >= 30
