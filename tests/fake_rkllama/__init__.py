"""A fake rkllama server for tests and for running exo without a board: see server.py.

    from fake_rkllama import FakeRkllamaServer
    async with FakeRkllamaServer(models_dir, api="early") as server:
        ...  # server.url, server.faults, server.generations()

or from the repository root: `python -m tests.fake_rkllama --help`.
"""
from .server import APIS, EARLY_SYSTEM, FakeRkllama, FakeRkllamaServer, Faults, Received, create_app

__all__ = ["APIS", "EARLY_SYSTEM", "FakeRkllama", "FakeRkllamaServer", "Faults", "Received", "create_app"]
