"""Set up exo on the fake RKLLM runtime, for developers without a board.

    python -m tests.fake_rkllm setup --dir /tmp/rkllm-fake [--version 1.2.3] [--decode-ms 60]

builds the fake librkllmrt.so, writes a model folder it serves (Qwen2.5's real
vocabulary, offline) and prints the environment and command that start exo on
it. Everything then runs as on a board: the native backend, its worker process,
the version check, streaming, KV reuse, abort. Only the answers are canned.

The model folder is in rkllama's layout too, so real rkllama accepts it: a
Modelfile with FROM and HUGGINGFACE_PATH (the absolute path of the folder's
tokenizer/ subfolder: rkllama 0.0.74 reads tokenizer/ itself, the early
/generate era hands HUGGINGFACE_PATH to AutoTokenizer, which takes a local
folder), and the tokenizer files both in tokenizer/ and beside the .rkllm file.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from . import DEMO_ANSWERS, TOKENIZER_FILES, build_fake_library, write_fake_model


def setup(args: argparse.Namespace) -> int:
    from exo_rkllm.models.demo import write_qwen_tokenizer
    from exo_rkllm.models.tokenizer import load_tokenizer

    root = Path(args.dir).expanduser().resolve()
    built = build_fake_library(args.version, root / "build")
    lib_dir = root / "lib"
    lib_dir.mkdir(parents=True, exist_ok=True)
    shutil.copy2(built, lib_dir / "librkllmrt.so")
    folder = root / "models" / "Qwen2.5-1.5B-Instruct-Fake"
    tok_dir = folder / "tokenizer"
    if not (tok_dir / "tokenizer.json").is_file():
        write_qwen_tokenizer(tok_dir)
    (tok_dir / "config.json").write_text(json.dumps({"model_type": "qwen2", "num_hidden_layers": 28}) + "\n")
    for name in TOKENIZER_FILES:  # the same files beside the .rkllm file, where exo-rkllm's catalog looks first
        if (tok_dir / name).is_file():
            shutil.copy2(tok_dir / name, folder / name)
    tok = load_tokenizer(folder)
    file_name = f"qwen2.5-1.5b-instruct-rk3588-w8a8-fake-{args.version}.rkllm"
    for old in folder.glob("*.rkllm"):
        old.unlink()
    settings = {"load_ms": args.load_ms, "prefill_base_ms": 40, "prefill_ms": args.prefill_ms,
                "decode_ms": args.decode_ms}
    if args.crash_on:
        settings.update(crash_at=5, crash_if_input_has=tok.encode(" " + args.crash_on)[0])
    write_fake_model(folder / file_name, tok, DEMO_ANSWERS, toolkit_version=args.version, **settings)
    (folder / "Modelfile").write_text(f'FROM="{file_name}"\nHUGGINGFACE_PATH="{tok_dir}"\nTEMPERATURE=0.8\n')
    print(f"""fake RKLLM runtime {args.version}: {lib_dir / 'librkllmrt.so'}
model folder:            {folder}

Start exo on it (legacy exo and exo-rkllm installed in this Python):

  export RKLLM_BACKEND=native RKLLM_LIB_PATH={lib_dir / 'librkllmrt.so'} RKLLM_MODELS_DIR={root / 'models'}
  export HF_HUB_OFFLINE=1
  python -m exo.main --inference-engine rkllm --disable-tui

or start real rkllama on it (its librkllmrt.so replaced by {lib_dir / 'librkllmrt.so'}) with
  rkllama_server --models {root / 'models'}      (0.0.74; python server.py in the early /generate era)

then ask exo (another terminal):

  curl -N http://localhost:52415/v1/chat/completions -H 'Content-Type: application/json' \\
    -d '{{"model": "qwen2.5-1.5b-instruct-fake", "stream": true,
         "messages": [{{"role": "user", "content": "Hello"}}]}}'
""")
    if args.crash_on:
        print(f"A prompt containing the word {args.crash_on} crashes the runtime at its 5th token: the request "
              "fails, the worker restarts, exo keeps serving.")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.fake_rkllm", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("setup", help="build the fake library and a model folder for exo")
    p.add_argument("--dir", required=True, help="folder to create (lib/, models/, build/)")
    p.add_argument("--version", default="1.2.3", help="runtime release to imitate: 1.1.4, 1.2.0, 1.2.3, 1.3.0 ...")
    p.add_argument("--decode-ms", type=float, default=60.0, help="milliseconds per generated token")
    p.add_argument("--prefill-ms", type=float, default=2.0, help="milliseconds per prompt token")
    p.add_argument("--load-ms", type=float, default=500.0, help="milliseconds to load the model")
    p.add_argument("--crash-on", metavar="WORD", help="crash at the 5th token of a prompt containing WORD")
    args = parser.parse_args(argv)
    return setup(args)


if __name__ == "__main__":
    sys.exit(main())
