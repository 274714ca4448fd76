"""Build the fake RKLLM runtime (fake_rkllm.c) and write the model files it serves.

Tests build one librkllmrt.so per runtime layout with the system C compiler,
into a temporary folder. Its "models" are small text files that name the token
ids the fake should answer with and the bytes of each of those tokens, taken
from a real tokenizer, so the text it streams is checkable byte for byte.

Developers without a board can use it to run exo end to end:

    python -m tests.fake_rkllm setup --dir /tmp/rkllm-fake --version 1.2.3

builds the library, writes a model folder (Qwen2.5 vocabulary) and prints the
environment to start exo with (see docs/developing.md, the doubles).
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any, Iterable, Sequence

SOURCE = Path(__file__).with_name("fake_rkllm.c")
LAYOUT_CODES = {"1.1.4": 114, "1.2.0": 120, "1.2.1": 121, "1.3.0": 130}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                   "tokenizer.model", "chat_template.jinja", "added_tokens.json", "config.json",
                   "generation_config.json")


def compiler() -> str | None:
    """The system C compiler ($CC, cc, gcc, clang), or None."""
    for candidate in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if candidate and shutil.which(candidate):
            return shutil.which(candidate)
    return None


def build_fake_library(version: str, out_dir: Path, *, layout: str | None = None) -> Path:
    """Compile the fake runtime claiming to be release `version`, with the struct layout of that
    release (or of `layout`, to build a library whose version no binding should accept)."""
    from exo_rkllm.runtime.native.library import SUPPORTED

    layout = layout or SUPPORTED[version]
    cc = compiler()
    if cc is None:
        raise RuntimeError("no C compiler found (set CC, or install gcc or clang)")
    source = SOURCE.read_bytes()
    digest = hashlib.sha256(source + version.encode() + layout.encode()).hexdigest()[:12]
    target = Path(out_dir) / f"fake-{version}-{layout}-{digest}" / "librkllmrt.so"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(f".tmp{os.getpid()}")
    cmd = [cc, "-shared", "-fPIC", "-O2", "-Wall", "-fvisibility=hidden",
           f"-DFAKE_RKLLM_LAYOUT={LAYOUT_CODES[layout]}", f'-DFAKE_RKLLM_VERSION="{version}"',
           "-o", str(tmp), str(SOURCE), "-lpthread", "-lm"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"building the fake runtime failed:\n{' '.join(cmd)}\n{done.stderr}")
    tmp.replace(target)
    return target


def _ids(tokenizer: Any, answer: str | Sequence[int], add_eos: bool) -> list[int]:
    if isinstance(answer, str):
        ids = list(tokenizer.encode(answer, add_special_tokens=False))
        return ids + [int(tokenizer.eos_token_id)] if add_eos else ids
    return [int(i) for i in answer]


def write_fake_model(path: Path, tokenizer: Any, answers: Iterable[str | Sequence[int]], *,
                     toolkit_version: str = "1.2.3", max_context_limit: int = 4096, platform: str = "RK3588",
                     add_eos: bool = True, magic: str = "RKLLM-FAKE-MODEL 1", **settings: Any) -> Path:
    """Write a model file for the fake runtime.

    `answers`: texts (encoded with `tokenizer`, EOS appended) or lists of token ids; the
    conversation's context picks one. `settings` become header keys: load_ms, prefill_base_ms,
    prefill_ms, decode_ms, error_at, error_if_input_has, crash_at, crash_if_input_has, crash_mode,
    waiting_style, finish_after_abort, emit_eos, crash_in_save, trace (all of them: fake_rkllm.c's header)."""
    from exo_rkllm.models.tokenizer import special_ids, stop_token_ids, token_bytes

    answer_ids = [_ids(tokenizer, a, add_eos) for a in answers]
    used = sorted({i for ids in answer_ids for i in ids})
    lines = [magic, f"toolkit_version={toolkit_version}", f"platform={platform}",
             f"max_context_limit={max_context_limit}",
             "stop=" + ",".join(str(i) for i in sorted(stop_token_ids(tokenizer))),
             "special=" + ",".join(str(i) for i in sorted(special_ids(tokenizer)))]
    for key, value in settings.items():
        if value is None:
            continue
        if isinstance(value, bool):
            value = int(value)
        lines.append(f"{key}={value}")
    lines += [f"piece={i}:{token_bytes(tokenizer, i).hex()}" for i in used]
    lines += ["answer=" + ",".join(str(i) for i in ids) for ids in answer_ids]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def write_fake_model_folder(models_dir: Path, name: str, tokenizer_dir: Path, tokenizer: Any,
                            answers: Iterable[str | Sequence[int]], *, file_name: str | None = None,
                            modelfile: dict[str, str] | None = None, copy_tokenizer: bool = True,
                            **settings: Any) -> Path:
    """A model folder in rkllama's layout (tokenizer files, Modelfile, .rkllm) served by the fake.
    With copy_tokenizer=False only config.json is copied (the tokenizer then comes from
    RKLLM_TOKENIZER_DIR, which lets tests share one loaded tokenizer)."""
    folder = Path(models_dir) / name
    folder.mkdir(parents=True, exist_ok=True)
    for file in TOKENIZER_FILES if copy_tokenizer else ("config.json",):
        if (Path(tokenizer_dir) / file).is_file():
            shutil.copy2(Path(tokenizer_dir) / file, folder / file)
    file_name = file_name or f"{name.lower()}-rk3588-w8a8-fake.rkllm"
    write_fake_model(folder / file_name, tokenizer, answers, **settings)
    rows = {"FROM": file_name, **(modelfile or {})}
    (folder / "Modelfile").write_text("".join(f'{k}="{v}"\n' for k, v in rows.items()), encoding="utf-8")
    return folder


# Answers the developer setup serves: multi-byte text everywhere, as in real chats.
DEMO_ANSWERS = (
    "Hello from the fake RKLLM runtime! 你好，世界 🤖 — the NPU is pretending, the bytes are real.",
    "Rockchip 芯片上的神经网络处理器很快。日本語のテキストも大丈夫です。"
    "👩‍💻 writes code; 🇫🇷 🇯🇵 flags too.",
    "Ça marche très bien, même à Noël. Größe, Straße. ¿Qué tal? Ελληνικά, Кириллица, हिन्दी ✅",
)
