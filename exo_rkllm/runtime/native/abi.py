"""rkllm.h transcribed into ctypes, one complete definition per runtime layout.

This module is deliberately literal: each layout class below restates the
enums, structs, callback type and function prototypes of one `rkllm.h`, field
by field and in header order, so that it can be checked line by line against
the header of that release (and is checked, size and offset, by
tests/test_native_abi.py against the struct sizes and field offsets of each release's
rkllm.h, computed by a C++ compiler on LP64 Linux and tabled in that test). There is
no logic here beyond "this release has this field"; the backend decides what
to do with a missing feature through the `HAS_*` flags each layout declares.
Each entry of a layout's PROTOTYPES table has the C declaration of its
release's rkllm.h quoted above it; library.RKLLMLibrary binds the table and
gives every function a typed method, which is what the backend calls.

Layouts (a release maps to the layout of the header it shipped):
  1.1.4  releases 1.1.0 - 1.1.4 (their rkllm.h is byte-identical)
  1.2.0  release 1.2.0
  1.2.1  releases 1.2.1, 1.2.2, 1.2.3 (1.2.3 only renames RKLLMMultiModelInput)
  1.3.0  release 1.3.0

Written on an LP64 target (aarch64 and x86-64 Linux): ctypes lays structs out
with the platform C rules, which is exactly what the runtime was compiled with.
"""
from __future__ import annotations

import ctypes
from ctypes import (CFUNCTYPE, POINTER, Structure, Union, c_bool, c_char_p, c_float, c_int, c_int8, c_int32,
                    c_size_t, c_uint8, c_uint32, c_uint64, c_void_p)
from typing import Any

# -- enums: the same numbers in every release ------------------------------------------------------
LLMHandle = c_void_p

# LLMCallState. 1.1.x also declares RKLLM_RUN_GET_LAST_HIDDEN_LAYER = 4: the state its callback reports the
# last hidden layer in (its llm_demo.cpp reads it there); from 1.2.0 on the demos read it in NORMAL.
RKLLM_RUN_NORMAL = 0
RKLLM_RUN_WAITING = 1
RKLLM_RUN_FINISH = 2
RKLLM_RUN_ERROR = 3
RKLLM_RUN_GET_LAST_HIDDEN_LAYER = 4  # 1.1.x only

# RKLLMInputType
RKLLM_INPUT_PROMPT = 0
RKLLM_INPUT_TOKEN = 1
RKLLM_INPUT_EMBED = 2
RKLLM_INPUT_MULTIMODAL = 3

# RKLLMInferMode (GET_LOGITS from 1.2.0 on)
RKLLM_INFER_GENERATE = 0
RKLLM_INFER_GET_LAST_HIDDEN_LAYER = 1
RKLLM_INFER_GET_LOGITS = 2

# CPU bits of RKLLMExtendParam.enabled_cpus_mask (1.2.0 on)
CPU0, CPU1, CPU2, CPU3, CPU4, CPU5, CPU6, CPU7 = (1 << i for i in range(8))

LLMCallState = c_int
RKLLMInputType = c_int
RKLLMInferMode = c_int


# -- structs that no release changed -----------------------------------------------------------------
class RKLLMLoraAdapter(Structure):
    _fields_ = [
        ("lora_adapter_path", c_char_p),
        ("lora_adapter_name", c_char_p),
        ("scale", c_float),
    ]


class RKLLMEmbedInput(Structure):
    _fields_ = [
        ("embed", POINTER(c_float)),
        ("n_tokens", c_size_t),
    ]


class RKLLMTokenInput(Structure):
    _fields_ = [
        ("input_ids", POINTER(c_int32)),
        ("n_tokens", c_size_t),
    ]


class RKLLMLoraParam(Structure):
    _fields_ = [
        ("lora_adapter_name", c_char_p),
    ]


class RKLLMPromptCacheParam(Structure):
    _fields_ = [
        ("save_prompt_cache", c_int),
        ("prompt_cache_path", c_char_p),
    ]


class RKLLMResultLastHiddenLayer(Structure):
    _fields_ = [
        ("hidden_states", POINTER(c_float)),
        ("embd_size", c_int),
        ("num_tokens", c_int),
    ]


# -- 1.1.0 - 1.1.4 -----------------------------------------------------------------------------------------
class V1_1_4:
    """rkllm.h of releases 1.1.0 to 1.1.4."""

    NAME = "1.1.4"
    HAS_KEEP_HISTORY = False
    HAS_CLEAR_KV_CACHE = False
    CLEAR_KV_CACHE_TAKES_RANGE = False
    HAS_KV_CACHE_SIZE = False
    HAS_CHAT_TEMPLATE = False
    HAS_N_KEEP = False
    HAS_CPU_MASK = False
    HAS_INPUT_ROLE = False
    HAS_PERF = False
    HAS_PER_RUN_SAMPLING = False
    HAS_PER_RUN_MAX_NEW_TOKENS = False
    HAS_LAST_HIDDEN_LAYER = True  # RKLLM_INFER_GET_LAST_HIDDEN_LAYER (embeddings)
    CALLBACK_RETURNS_INT = False
    INIT_TAKES_CALLBACK_STRUCT = False
    IS_RUNNING_MEANS_RUNNING = 0  # documented: 0 while a task runs

    class RKLLMExtendParam(Structure):
        _fields_ = [
            ("base_domain_id", c_int32),
            ("reserved", c_uint8 * 112),
        ]

    class RKLLMParam(Structure):
        pass

    RKLLMParam._fields_ = [
        ("model_path", c_char_p),
        ("max_context_len", c_int32),
        ("max_new_tokens", c_int32),
        ("top_k", c_int32),
        ("top_p", c_float),
        ("temperature", c_float),
        ("repeat_penalty", c_float),
        ("frequency_penalty", c_float),
        ("presence_penalty", c_float),
        ("mirostat", c_int32),
        ("mirostat_tau", c_float),
        ("mirostat_eta", c_float),
        ("skip_special_token", c_bool),
        ("is_async", c_bool),
        ("img_start", c_char_p),
        ("img_end", c_char_p),
        ("img_content", c_char_p),
        ("extend_param", RKLLMExtendParam),
    ]

    RKLLMLoraAdapter = RKLLMLoraAdapter
    RKLLMEmbedInput = RKLLMEmbedInput
    RKLLMTokenInput = RKLLMTokenInput

    class RKLLMMultiModelInput(Structure):
        _fields_ = [
            ("prompt", c_char_p),
            ("image_embed", POINTER(c_float)),
            ("n_image_tokens", c_size_t),
        ]

    class RKLLMInputUnion(Union):
        pass

    RKLLMInputUnion._fields_ = [
        ("prompt_input", c_char_p),
        ("embed_input", RKLLMEmbedInput),
        ("token_input", RKLLMTokenInput),
        ("multimodal_input", RKLLMMultiModelInput),
    ]

    class RKLLMInput(Structure):
        pass

    RKLLMInput._anonymous_ = ("u",)
    RKLLMInput._fields_ = [
        ("input_type", RKLLMInputType),
        ("u", RKLLMInputUnion),
    ]

    RKLLMLoraParam = RKLLMLoraParam
    RKLLMPromptCacheParam = RKLLMPromptCacheParam

    class RKLLMInferParam(Structure):
        _fields_ = [
            ("mode", RKLLMInferMode),
            ("lora_params", POINTER(RKLLMLoraParam)),
            ("prompt_cache_params", POINTER(RKLLMPromptCacheParam)),
        ]

    RKLLMResultLastHiddenLayer = RKLLMResultLastHiddenLayer

    class RKLLMResult(Structure):
        _fields_ = [
            ("text", c_char_p),
            ("token_id", c_int32),
            ("last_hidden_layer", RKLLMResultLastHiddenLayer),
        ]

    LLMResultCallback = CFUNCTYPE(None, POINTER(RKLLMResult), c_void_p, LLMCallState)

    PROTOTYPES: list[tuple[str, Any, list[Any]]] = [
        # RKLLMParam rkllm_createDefaultParam();
        ("rkllm_createDefaultParam", RKLLMParam, []),
        # int rkllm_init(LLMHandle* handle, RKLLMParam* param, LLMResultCallback callback);
        ("rkllm_init", c_int, [POINTER(LLMHandle), POINTER(RKLLMParam), LLMResultCallback]),
        # int rkllm_load_lora(LLMHandle handle, RKLLMLoraAdapter* lora_adapter);
        ("rkllm_load_lora", c_int, [LLMHandle, POINTER(RKLLMLoraAdapter)]),
        # int rkllm_load_prompt_cache(LLMHandle handle, const char* prompt_cache_path);
        ("rkllm_load_prompt_cache", c_int, [LLMHandle, c_char_p]),
        # int rkllm_release_prompt_cache(LLMHandle handle);
        ("rkllm_release_prompt_cache", c_int, [LLMHandle]),
        # int rkllm_destroy(LLMHandle handle);
        ("rkllm_destroy", c_int, [LLMHandle]),
        # int rkllm_run(LLMHandle handle, RKLLMInput* rkllm_input, RKLLMInferParam* rkllm_infer_params, void* userdata);
        ("rkllm_run", c_int, [LLMHandle, POINTER(RKLLMInput), POINTER(RKLLMInferParam), c_void_p]),
        # int rkllm_run_async(LLMHandle handle, RKLLMInput* rkllm_input, RKLLMInferParam* rkllm_infer_params, void* userdata);
        ("rkllm_run_async", c_int, [LLMHandle, POINTER(RKLLMInput), POINTER(RKLLMInferParam), c_void_p]),
        # int rkllm_abort(LLMHandle handle);
        ("rkllm_abort", c_int, [LLMHandle]),
        # int rkllm_is_running(LLMHandle handle);
        ("rkllm_is_running", c_int, [LLMHandle]),
    ]


# -- 1.2.0 ---------------------------------------------------------------------------------------------------
class RKLLMResultLogits(Structure):
    _fields_ = [
        ("logits", POINTER(c_float)),
        ("vocab_size", c_int),
        ("num_tokens", c_int),
    ]


class V1_2_0:
    """rkllm.h of release 1.2.0."""

    NAME = "1.2.0"
    HAS_KEEP_HISTORY = True
    HAS_CLEAR_KV_CACHE = True
    CLEAR_KV_CACHE_TAKES_RANGE = False
    HAS_KV_CACHE_SIZE = False
    HAS_CHAT_TEMPLATE = True
    HAS_N_KEEP = True
    HAS_CPU_MASK = True
    HAS_INPUT_ROLE = False
    HAS_PERF = False
    HAS_PER_RUN_SAMPLING = False
    HAS_PER_RUN_MAX_NEW_TOKENS = False
    HAS_LAST_HIDDEN_LAYER = True  # RKLLM_INFER_GET_LAST_HIDDEN_LAYER (embeddings)
    CALLBACK_RETURNS_INT = False
    INIT_TAKES_CALLBACK_STRUCT = False
    IS_RUNNING_MEANS_RUNNING = 0

    class RKLLMExtendParam(Structure):
        _fields_ = [
            ("base_domain_id", c_int32),
            ("embed_flash", c_int8),
            ("enabled_cpus_num", c_int8),
            ("enabled_cpus_mask", c_uint32),
            ("reserved", c_uint8 * 106),
        ]

    class RKLLMParam(Structure):
        pass

    RKLLMParam._fields_ = [
        ("model_path", c_char_p),
        ("max_context_len", c_int32),
        ("max_new_tokens", c_int32),
        ("top_k", c_int32),
        ("n_keep", c_int32),
        ("top_p", c_float),
        ("temperature", c_float),
        ("repeat_penalty", c_float),
        ("frequency_penalty", c_float),
        ("presence_penalty", c_float),
        ("mirostat", c_int32),
        ("mirostat_tau", c_float),
        ("mirostat_eta", c_float),
        ("skip_special_token", c_bool),
        ("is_async", c_bool),
        ("img_start", c_char_p),
        ("img_end", c_char_p),
        ("img_content", c_char_p),
        ("extend_param", RKLLMExtendParam),
    ]

    RKLLMLoraAdapter = RKLLMLoraAdapter
    RKLLMEmbedInput = RKLLMEmbedInput
    RKLLMTokenInput = RKLLMTokenInput

    class RKLLMMultiModelInput(Structure):
        _fields_ = [
            ("prompt", c_char_p),
            ("image_embed", POINTER(c_float)),
            ("n_image_tokens", c_size_t),
        ]

    class RKLLMInputUnion(Union):
        pass

    RKLLMInputUnion._fields_ = [
        ("prompt_input", c_char_p),
        ("embed_input", RKLLMEmbedInput),
        ("token_input", RKLLMTokenInput),
        ("multimodal_input", RKLLMMultiModelInput),
    ]

    class RKLLMInput(Structure):
        pass

    RKLLMInput._anonymous_ = ("u",)
    RKLLMInput._fields_ = [
        ("input_type", RKLLMInputType),
        ("u", RKLLMInputUnion),
    ]

    RKLLMLoraParam = RKLLMLoraParam
    RKLLMPromptCacheParam = RKLLMPromptCacheParam

    class RKLLMInferParam(Structure):
        _fields_ = [
            ("mode", RKLLMInferMode),
            ("lora_params", POINTER(RKLLMLoraParam)),
            ("prompt_cache_params", POINTER(RKLLMPromptCacheParam)),
            ("keep_history", c_int),
        ]

    RKLLMResultLastHiddenLayer = RKLLMResultLastHiddenLayer
    RKLLMResultLogits = RKLLMResultLogits

    class RKLLMResult(Structure):
        _fields_ = [
            ("text", c_char_p),
            ("token_id", c_int32),
            ("last_hidden_layer", RKLLMResultLastHiddenLayer),
            ("logits", RKLLMResultLogits),
        ]

    LLMResultCallback = CFUNCTYPE(None, POINTER(RKLLMResult), c_void_p, LLMCallState)

    PROTOTYPES: list[tuple[str, Any, list[Any]]] = [
        # RKLLMParam rkllm_createDefaultParam();
        ("rkllm_createDefaultParam", RKLLMParam, []),
        # int rkllm_init(LLMHandle* handle, RKLLMParam* param, LLMResultCallback callback);
        ("rkllm_init", c_int, [POINTER(LLMHandle), POINTER(RKLLMParam), LLMResultCallback]),
        # int rkllm_load_lora(LLMHandle handle, RKLLMLoraAdapter* lora_adapter);
        ("rkllm_load_lora", c_int, [LLMHandle, POINTER(RKLLMLoraAdapter)]),
        # int rkllm_load_prompt_cache(LLMHandle handle, const char* prompt_cache_path);
        ("rkllm_load_prompt_cache", c_int, [LLMHandle, c_char_p]),
        # int rkllm_release_prompt_cache(LLMHandle handle);
        ("rkllm_release_prompt_cache", c_int, [LLMHandle]),
        # int rkllm_destroy(LLMHandle handle);
        ("rkllm_destroy", c_int, [LLMHandle]),
        # int rkllm_run(LLMHandle handle, RKLLMInput* rkllm_input, RKLLMInferParam* rkllm_infer_params, void* userdata);
        ("rkllm_run", c_int, [LLMHandle, POINTER(RKLLMInput), POINTER(RKLLMInferParam), c_void_p]),
        # int rkllm_run_async(LLMHandle handle, RKLLMInput* rkllm_input, RKLLMInferParam* rkllm_infer_params, void* userdata);
        ("rkllm_run_async", c_int, [LLMHandle, POINTER(RKLLMInput), POINTER(RKLLMInferParam), c_void_p]),
        # int rkllm_abort(LLMHandle handle);
        ("rkllm_abort", c_int, [LLMHandle]),
        # int rkllm_is_running(LLMHandle handle);
        ("rkllm_is_running", c_int, [LLMHandle]),
        # int rkllm_clear_kv_cache(LLMHandle handle, int keep_system_prompt);
        ("rkllm_clear_kv_cache", c_int, [LLMHandle, c_int]),
        # int rkllm_set_chat_template(LLMHandle handle, const char* system_prompt, const char* prompt_prefix, const char* prompt_postfix);
        ("rkllm_set_chat_template", c_int, [LLMHandle, c_char_p, c_char_p, c_char_p]),
    ]


# -- 1.2.1 - 1.2.3 -----------------------------------------------------------------------------------------
class RKLLMPerfStat(Structure):
    _fields_ = [
        ("prefill_time_ms", c_float),
        ("prefill_tokens", c_int),
        ("generate_time_ms", c_float),
        ("generate_tokens", c_int),
        ("memory_usage_mb", c_float),
    ]


class RKLLMCrossAttnParam(Structure):
    _fields_ = [
        ("encoder_k_cache", POINTER(c_float)),
        ("encoder_v_cache", POINTER(c_float)),
        ("encoder_mask", POINTER(c_float)),
        ("encoder_pos", POINTER(c_int32)),
        ("num_tokens", c_int),
    ]


class V1_2_1:
    """rkllm.h of releases 1.2.1, 1.2.2 and 1.2.3."""

    NAME = "1.2.1"
    HAS_KEEP_HISTORY = True
    HAS_CLEAR_KV_CACHE = True
    CLEAR_KV_CACHE_TAKES_RANGE = True
    HAS_KV_CACHE_SIZE = True
    HAS_CHAT_TEMPLATE = True
    HAS_N_KEEP = True
    HAS_CPU_MASK = True
    HAS_INPUT_ROLE = True
    HAS_PERF = True
    HAS_PER_RUN_SAMPLING = False
    HAS_PER_RUN_MAX_NEW_TOKENS = False
    HAS_LAST_HIDDEN_LAYER = True  # RKLLM_INFER_GET_LAST_HIDDEN_LAYER (embeddings)
    CALLBACK_RETURNS_INT = True
    INIT_TAKES_CALLBACK_STRUCT = False
    IS_RUNNING_MEANS_RUNNING = 0

    class RKLLMExtendParam(Structure):
        _fields_ = [
            ("base_domain_id", c_int32),
            ("embed_flash", c_int8),
            ("enabled_cpus_num", c_int8),
            ("enabled_cpus_mask", c_uint32),
            ("n_batch", c_uint8),
            ("use_cross_attn", c_int8),
            ("reserved", c_uint8 * 104),
        ]

    class RKLLMParam(Structure):
        pass

    RKLLMParam._fields_ = [
        ("model_path", c_char_p),
        ("max_context_len", c_int32),
        ("max_new_tokens", c_int32),
        ("top_k", c_int32),
        ("n_keep", c_int32),
        ("top_p", c_float),
        ("temperature", c_float),
        ("repeat_penalty", c_float),
        ("frequency_penalty", c_float),
        ("presence_penalty", c_float),
        ("mirostat", c_int32),
        ("mirostat_tau", c_float),
        ("mirostat_eta", c_float),
        ("skip_special_token", c_bool),
        ("is_async", c_bool),
        ("img_start", c_char_p),
        ("img_end", c_char_p),
        ("img_content", c_char_p),
        ("extend_param", RKLLMExtendParam),
    ]

    RKLLMLoraAdapter = RKLLMLoraAdapter
    RKLLMEmbedInput = RKLLMEmbedInput
    RKLLMTokenInput = RKLLMTokenInput

    class RKLLMMultiModalInput(Structure):  # RKLLMMultiModelInput in 1.2.1 / 1.2.2: same fields
        _fields_ = [
            ("prompt", c_char_p),
            ("image_embed", POINTER(c_float)),
            ("n_image_tokens", c_size_t),
            ("n_image", c_size_t),
            ("image_width", c_size_t),
            ("image_height", c_size_t),
        ]

    RKLLMMultiModelInput = RKLLMMultiModalInput

    class RKLLMInputUnion(Union):
        pass

    RKLLMInputUnion._fields_ = [
        ("prompt_input", c_char_p),
        ("embed_input", RKLLMEmbedInput),
        ("token_input", RKLLMTokenInput),
        ("multimodal_input", RKLLMMultiModalInput),
    ]

    class RKLLMInput(Structure):
        pass

    RKLLMInput._anonymous_ = ("u",)
    RKLLMInput._fields_ = [
        ("role", c_char_p),
        ("enable_thinking", c_bool),
        ("input_type", RKLLMInputType),
        ("u", RKLLMInputUnion),
    ]

    RKLLMLoraParam = RKLLMLoraParam
    RKLLMPromptCacheParam = RKLLMPromptCacheParam
    RKLLMCrossAttnParam = RKLLMCrossAttnParam

    class RKLLMInferParam(Structure):
        _fields_ = [
            ("mode", RKLLMInferMode),
            ("lora_params", POINTER(RKLLMLoraParam)),
            ("prompt_cache_params", POINTER(RKLLMPromptCacheParam)),
            ("keep_history", c_int),
        ]

    RKLLMResultLastHiddenLayer = RKLLMResultLastHiddenLayer
    RKLLMResultLogits = RKLLMResultLogits
    RKLLMPerfStat = RKLLMPerfStat

    class RKLLMResult(Structure):
        _fields_ = [
            ("text", c_char_p),
            ("token_id", c_int32),
            ("last_hidden_layer", RKLLMResultLastHiddenLayer),
            ("logits", RKLLMResultLogits),
            ("perf", RKLLMPerfStat),
        ]

    # Returns 0 to continue, 1 to pause the run (resumed by another rkllm_run).
    LLMResultCallback = CFUNCTYPE(c_int, POINTER(RKLLMResult), c_void_p, LLMCallState)

    PROTOTYPES: list[tuple[str, Any, list[Any]]] = [
        # RKLLMParam rkllm_createDefaultParam();
        ("rkllm_createDefaultParam", RKLLMParam, []),
        # int rkllm_init(LLMHandle* handle, RKLLMParam* param, LLMResultCallback callback);
        ("rkllm_init", c_int, [POINTER(LLMHandle), POINTER(RKLLMParam), LLMResultCallback]),
        # int rkllm_load_lora(LLMHandle handle, RKLLMLoraAdapter* lora_adapter);
        ("rkllm_load_lora", c_int, [LLMHandle, POINTER(RKLLMLoraAdapter)]),
        # int rkllm_load_prompt_cache(LLMHandle handle, const char* prompt_cache_path);
        ("rkllm_load_prompt_cache", c_int, [LLMHandle, c_char_p]),
        # int rkllm_release_prompt_cache(LLMHandle handle);
        ("rkllm_release_prompt_cache", c_int, [LLMHandle]),
        # int rkllm_destroy(LLMHandle handle);
        ("rkllm_destroy", c_int, [LLMHandle]),
        # int rkllm_run(LLMHandle handle, RKLLMInput* rkllm_input, RKLLMInferParam* rkllm_infer_params, void* userdata);
        ("rkllm_run", c_int, [LLMHandle, POINTER(RKLLMInput), POINTER(RKLLMInferParam), c_void_p]),
        # int rkllm_run_async(LLMHandle handle, RKLLMInput* rkllm_input, RKLLMInferParam* rkllm_infer_params, void* userdata);
        ("rkllm_run_async", c_int, [LLMHandle, POINTER(RKLLMInput), POINTER(RKLLMInferParam), c_void_p]),
        # int rkllm_abort(LLMHandle handle);
        ("rkllm_abort", c_int, [LLMHandle]),
        # int rkllm_is_running(LLMHandle handle);
        ("rkllm_is_running", c_int, [LLMHandle]),
        # int rkllm_clear_kv_cache(LLMHandle handle, int keep_system_prompt, int* start_pos, int* end_pos);
        ("rkllm_clear_kv_cache", c_int, [LLMHandle, c_int, POINTER(c_int), POINTER(c_int)]),
        # int rkllm_get_kv_cache_size(LLMHandle handle, int* cache_sizes);
        ("rkllm_get_kv_cache_size", c_int, [LLMHandle, POINTER(c_int)]),
        # int rkllm_set_chat_template(LLMHandle handle, const char* system_prompt, const char* prompt_prefix, const char* prompt_postfix);
        ("rkllm_set_chat_template", c_int, [LLMHandle, c_char_p, c_char_p, c_char_p]),
        # int rkllm_set_function_tools(LLMHandle handle, const char* system_prompt, const char* tools, const char* tool_response_str);
        ("rkllm_set_function_tools", c_int, [LLMHandle, c_char_p, c_char_p, c_char_p]),
        # int rkllm_set_cross_attn_params(LLMHandle handle, RKLLMCrossAttnParam* cross_attn_params);
        ("rkllm_set_cross_attn_params", c_int, [LLMHandle, POINTER(RKLLMCrossAttnParam)]),
    ]


# -- 1.3.0 ---------------------------------------------------------------------------------------------------
class V1_3_0:
    """rkllm.h of release 1.3.0."""

    NAME = "1.3.0"
    HAS_KEEP_HISTORY = True
    HAS_CLEAR_KV_CACHE = True
    CLEAR_KV_CACHE_TAKES_RANGE = True
    HAS_KV_CACHE_SIZE = True
    HAS_CHAT_TEMPLATE = True
    HAS_N_KEEP = True
    HAS_CPU_MASK = True
    HAS_INPUT_ROLE = True
    HAS_PERF = True
    HAS_PER_RUN_SAMPLING = True
    HAS_PER_RUN_MAX_NEW_TOKENS = True
    HAS_LAST_HIDDEN_LAYER = True  # RKLLM_INFER_GET_LAST_HIDDEN_LAYER (embeddings)
    CALLBACK_RETURNS_INT = True
    INIT_TAKES_CALLBACK_STRUCT = True
    IS_RUNNING_MEANS_RUNNING = 1  # documented: 1 while a task runs

    # int (*)(void* userdata, int32_t* tokens, uint64_t num_tokens, void* embed, uint64_t len)
    LLMGetEmbedCallback = CFUNCTYPE(c_int, c_void_p, POINTER(c_int32), c_uint64, c_void_p, c_uint64)
    # int (*)(void* userdata, const char* text, int32_t text_len, int32_t* tokens, int32_t n_tokens_max)
    LLMTokenizerCallback = CFUNCTYPE(c_int, c_void_p, c_char_p, c_int32, POINTER(c_int32), c_int32)

    class RKLLMExtendParam(Structure):
        _fields_ = [
            ("base_domain_id", c_int32),
            ("embed_flash", c_int8),
            ("enabled_cpus_num", c_int8),
            ("enabled_cpus_mask", c_uint32),
            ("n_batch", c_uint8),
            ("use_cross_attn", c_int8),
            ("reserved", c_uint8 * 104),
        ]

    class RKLLMParam(Structure):
        pass

    RKLLMParam._fields_ = [
        ("model_path", c_char_p),
        ("max_context_len", c_int32),
        ("max_new_tokens", c_int32),
        ("top_k", c_int32),
        ("n_keep", c_int32),
        ("top_p", c_float),
        ("temperature", c_float),
        ("repeat_penalty", c_float),
        ("frequency_penalty", c_float),
        ("presence_penalty", c_float),
        ("mirostat", c_int32),
        ("mirostat_tau", c_float),
        ("mirostat_eta", c_float),
        ("skip_special_token", c_bool),
        ("ignore_eos_token", c_bool),
        ("is_async", c_bool),
        ("extend_param", RKLLMExtendParam),
    ]

    RKLLMLoraAdapter = RKLLMLoraAdapter
    RKLLMEmbedInput = RKLLMEmbedInput
    RKLLMTokenInput = RKLLMTokenInput

    class RKLLMMultiModalImage(Structure):
        _fields_ = [
            ("image_embed", POINTER(c_float)),
            ("n_image_tokens", c_size_t),
            ("n_image", c_size_t),
            ("image_start", c_char_p),
            ("image_end", c_char_p),
            ("image_content", c_char_p),
            ("image_width", c_size_t),
            ("image_height", c_size_t),
        ]

    class RKLLMMultiModalVideo(Structure):
        _fields_ = [
            ("video_embed", POINTER(c_float)),
            ("n_frame_tokens", c_size_t),
            ("n_frame_per_video", c_size_t),
            ("n_video", c_size_t),
            ("video_start", c_char_p),
            ("video_end", c_char_p),
            ("video_content", c_char_p),
            ("frame_width", c_size_t),
            ("frame_height", c_size_t),
        ]

    class RKLLMMultiModalInput(Structure):
        pass

    RKLLMMultiModalInput._fields_ = [
        ("prompt", c_char_p),
        ("image", RKLLMMultiModalImage),
        ("video", RKLLMMultiModalVideo),
    ]

    class RKLLMInputUnion(Union):
        pass

    RKLLMInputUnion._fields_ = [
        ("prompt_input", c_char_p),
        ("embed_input", RKLLMEmbedInput),
        ("token_input", RKLLMTokenInput),
        ("multimodal_input", RKLLMMultiModalInput),
    ]

    class RKLLMInput(Structure):
        pass

    RKLLMInput._anonymous_ = ("u",)
    RKLLMInput._fields_ = [
        ("role", c_char_p),
        ("enable_thinking", c_bool),
        ("input_type", RKLLMInputType),
        ("u", RKLLMInputUnion),
    ]

    RKLLMLoraParam = RKLLMLoraParam
    RKLLMPromptCacheParam = RKLLMPromptCacheParam
    RKLLMCrossAttnParam = RKLLMCrossAttnParam

    # Per run through RKLLMInferParam.sampling_params: when set, it replaces every sampling value of
    # RKLLMParam for that run (mirostat included). No release, this one included, has a seed field.
    class RKLLMSamplingParam(Structure):
        _fields_ = [
            ("top_k", c_int32),
            ("top_p", c_float),
            ("temperature", c_float),
            ("repeat_penalty", c_float),
            ("frequency_penalty", c_float),
            ("presence_penalty", c_float),
            ("mirostat", c_int32),
            ("mirostat_tau", c_float),
            ("mirostat_eta", c_float),
        ]

    class RKLLMInferParam(Structure):
        pass

    RKLLMInferParam._fields_ = [
        ("mode", RKLLMInferMode),
        ("lora_params", POINTER(RKLLMLoraParam)),
        ("prompt_cache_params", POINTER(RKLLMPromptCacheParam)),
        ("sampling_params", POINTER(RKLLMSamplingParam)),
        ("keep_history", c_int),
        ("max_new_tokens", c_int32),
    ]

    RKLLMResultLastHiddenLayer = RKLLMResultLastHiddenLayer
    RKLLMResultLogits = RKLLMResultLogits
    RKLLMPerfStat = RKLLMPerfStat

    class RKLLMResult(Structure):
        _fields_ = [
            ("text", c_char_p),
            ("token_id", c_int32),
            ("last_hidden_layer", RKLLMResultLastHiddenLayer),
            ("logits", RKLLMResultLogits),
            ("perf", RKLLMPerfStat),
        ]

    # Returns 0 to continue, 1 to pause, 2 to release the current output buffer.
    LLMResultCallback = CFUNCTYPE(c_int, POINTER(RKLLMResult), c_void_p, LLMCallState)

    class RKLLMCallback(Structure):
        pass

    RKLLMCallback._fields_ = [
        ("result_callback", LLMResultCallback),
        ("result_userdata", c_void_p),
        ("tokenizer_callback", LLMTokenizerCallback),
        ("tokenizer_userdata", c_void_p),
        ("embed_callback", LLMGetEmbedCallback),
        ("embed_userdata", c_void_p),
    ]

    PROTOTYPES: list[tuple[str, Any, list[Any]]] = [
        # RKLLMParam rkllm_createDefaultParam();
        ("rkllm_createDefaultParam", RKLLMParam, []),
        # int rkllm_init(LLMHandle* handle, RKLLMParam* param, RKLLMCallback* callback);
        ("rkllm_init", c_int, [POINTER(LLMHandle), POINTER(RKLLMParam), POINTER(RKLLMCallback)]),
        # int rkllm_load_lora(LLMHandle handle, RKLLMLoraAdapter* lora_adapter);
        ("rkllm_load_lora", c_int, [LLMHandle, POINTER(RKLLMLoraAdapter)]),
        # int rkllm_load_prompt_cache(LLMHandle handle, const char* prompt_cache_path);
        ("rkllm_load_prompt_cache", c_int, [LLMHandle, c_char_p]),
        # int rkllm_release_prompt_cache(LLMHandle handle);
        ("rkllm_release_prompt_cache", c_int, [LLMHandle]),
        # int rkllm_destroy(LLMHandle handle);
        ("rkllm_destroy", c_int, [LLMHandle]),
        # int rkllm_run(LLMHandle handle, RKLLMInput* rkllm_input, RKLLMInferParam* rkllm_infer_params, void* userdata);
        ("rkllm_run", c_int, [LLMHandle, POINTER(RKLLMInput), POINTER(RKLLMInferParam), c_void_p]),
        # int rkllm_run_async(LLMHandle handle, RKLLMInput* rkllm_input, RKLLMInferParam* rkllm_infer_params, void* userdata);
        ("rkllm_run_async", c_int, [LLMHandle, POINTER(RKLLMInput), POINTER(RKLLMInferParam), c_void_p]),
        # int rkllm_abort(LLMHandle handle);
        ("rkllm_abort", c_int, [LLMHandle]),
        # int rkllm_is_running(LLMHandle handle);
        ("rkllm_is_running", c_int, [LLMHandle]),
        # int rkllm_clear_kv_cache(LLMHandle handle, int keep_system_prompt, int* start_pos, int* end_pos);
        ("rkllm_clear_kv_cache", c_int, [LLMHandle, c_int, POINTER(c_int), POINTER(c_int)]),
        # int rkllm_get_kv_cache_size(LLMHandle handle, int* cache_sizes);
        ("rkllm_get_kv_cache_size", c_int, [LLMHandle, POINTER(c_int)]),
        # int rkllm_set_chat_template(LLMHandle handle, const char* system_prompt, const char* prompt_prefix, const char* prompt_postfix);
        ("rkllm_set_chat_template", c_int, [LLMHandle, c_char_p, c_char_p, c_char_p]),
        # int rkllm_set_function_tools(LLMHandle handle, const char* system_prompt, const char* tools, const char* tool_response_str);
        ("rkllm_set_function_tools", c_int, [LLMHandle, c_char_p, c_char_p, c_char_p]),
        # int rkllm_set_cross_attn_params(LLMHandle handle, RKLLMCrossAttnParam* cross_attn_params);
        ("rkllm_set_cross_attn_params", c_int, [LLMHandle, POINTER(RKLLMCrossAttnParam)]),
    ]


Layout = Any  # one of the V* classes above (they are namespaces, not instances)

LAYOUTS: dict[str, Layout] = {"1.1.4": V1_1_4, "1.2.0": V1_2_0, "1.2.1": V1_2_1, "1.3.0": V1_3_0}


def bind(lib: ctypes.CDLL, layout: Layout) -> dict[str, Any]:
    """Give every function of `layout` its prototype; returns name -> foreign function (for
    RKLLMLibrary, whose typed methods are what callers use, and for benchmarks that time the bare C calls).

    Raises AttributeError naming the first symbol the library lacks: a library that lacks a
    function its release declares is not the release we were told it is."""
    functions: dict[str, Any] = {}
    for name, restype, argtypes in layout.PROTOTYPES:
        fn = getattr(lib, name)
        fn.restype = restype
        fn.argtypes = argtypes
        functions[name] = fn
    return functions
