#!/usr/bin/env python3
"""Run the exo-rkllm benchmark: the same as `exo-rkllm bench` (see --help).

Kept as a script so a board with a plain checkout can run it without the
console entry point: `python benchmarks/bench.py --sim`.
"""
import os
import sys

if __name__ == "__main__":
    try:
        from exo_rkllm.bench.cli import main
    except ImportError:  # a checkout that is not installed: use it in place
        sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        from exo_rkllm.bench.cli import main
    raise SystemExit(main())
