"""The benchmark suite: five prompt categories through exo's API, an rkllama server or the runtime itself.

Entry point: `exo_rkllm.bench.cli.main` (`exo-rkllm bench`, `benchmarks/bench.py`).
"""
