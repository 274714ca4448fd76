"""The runtime worker: a child process that owns librkllmrt.so so a crash in it cannot take exo down.

Started by IsolatedRuntime as `python -m exo_rkllm.runtime.native.worker --fd N`
with one end of a socket pair. It loads the library named in the first
message, then serves commands: control calls (load, unload, clear_kv_cache,
load_prompt_cache, kv_cache_len, embed, close) on this thread, each generation
on a thread of its own so an Abort is handled while rkllm_run blocks. An
embedding is a control call: it is one prefill, which nothing aborts, and exo
sends nothing else meanwhile (the scheduler serialises). Tokens are sent from
the runtime's callback thread itself, with no hop through another thread.

It ignores SIGINT (Ctrl-C in exo's terminal belongs to exo, which closes the
worker in order) and exits when exo's end of the socket closes, whatever the
reason exo went away.
"""
from __future__ import annotations

import argparse
import faulthandler
import logging
import os
import signal
import sys
import threading
from multiprocessing.connection import Connection
from typing import Any

from exo_rkllm.runtime.native.backend import NativeSession
from exo_rkllm.runtime.native.ipc import Abort, Call, Configure, EmbedResult, Failed, Finished, Generate, Hello, RemoteError, Reply, Token
from exo_rkllm.runtime.native.library import RKLLMLibrary

log = logging.getLogger("exo_rkllm.native.worker")

# Seconds the previous generation's thread may take to exit before a new Generate is refused as busy: exo
# sends the next one only after that thread's Finished/Failed, its last act, so it is already returning.
PREVIOUS_RUN_EXIT_S = 1.0
# Seconds, on the way out, for rkllm_run to return after the abort, then for rkllm_destroy: bounded so a
# hung vendor library cannot keep the worker alive (exo's side kills it after IsolatedRuntime.CLOSE_TIMEOUT).
SHUTDOWN_RUN_EXIT_S = 5.0
SHUTDOWN_DESTROY_S = 10.0


class Worker:
    def __init__(self, conn: Connection, session: NativeSession) -> None:
        self.conn = conn
        self.session = session
        self._send_lock = threading.Lock()
        self._gen_thread: threading.Thread | None = None
        self._gen_seq: int | None = None
        self._gen_cancel = threading.Event()

    def send(self, msg: Any) -> None:
        with self._send_lock:
            self.conn.send(msg)

    def serve(self) -> None:
        try:
            while True:
                try:
                    msg = self.conn.recv()
                except (EOFError, OSError):
                    log.debug("exo closed the connection: stopping")
                    return
                if isinstance(msg, Generate):
                    self._start_generation(msg)
                elif isinstance(msg, Abort):
                    if msg.seq == self._gen_seq:
                        self._gen_cancel.set()  # in case the generation thread has not reached rkllm_run
                        self.session.abort()
                elif isinstance(msg, Call):
                    if not self._call(msg):
                        return
        finally:
            self._shutdown()

    def _call(self, msg: Call) -> bool:
        """Run one control call and reply; False once the worker should stop."""
        try:
            if msg.op == "load":
                self.session.load(msg.arg)
                value: Any = self.session.kv_cache_len()
            elif msg.op == "unload":
                self.session.unload()
                value = None
            elif msg.op == "clear_kv_cache":
                self.session.clear_kv_cache()
                value = self.session.kv_cache_len()
            elif msg.op == "load_prompt_cache":
                self.session.load_prompt_cache(msg.arg)
                value = self.session.kv_cache_len()  # what the file held: the parent's kv_cache_len() reports it
            elif msg.op == "kv_cache_len":
                value = self.session.kv_cache_len()
            elif msg.op == "embed":
                value = EmbedResult(self.session.embed(msg.arg), self.session.kv_cache_len())
            elif msg.op == "ping":
                value = os.getpid()
            elif msg.op == "close":
                self.session.close()
                self.send(Reply(msg.seq, None))
                return False
            else:
                raise ValueError(f"unknown operation {msg.op!r}")
        except BaseException as exc:  # noqa: BLE001 - every failure goes back to exo
            self.send(Reply(msg.seq, error=RemoteError.of(exc)))
            return True
        self.send(Reply(msg.seq, value))
        return True

    def _start_generation(self, msg: Generate) -> None:
        if self._gen_thread is not None:
            # exo sends a new generation only after the previous one's Finished/Failed, which the
            # run thread sends as its last act: give it the moment it needs to exit.
            self._gen_thread.join(timeout=PREVIOUS_RUN_EXIT_S)
        if self._gen_thread is not None and self._gen_thread.is_alive():
            self.send(Failed(msg.seq, RemoteError("GenerationError", "the runtime is busy: one generation at a "
                                                                     "time per context"), None))
            return
        self._gen_seq = msg.seq
        self._gen_cancel = threading.Event()
        self._gen_thread = threading.Thread(target=self._generate, args=(msg, self._gen_cancel), name="rkllm-run",
                                            daemon=True)
        self._gen_thread.start()

    def _generate(self, msg: Generate, cancelled: threading.Event) -> None:
        seq, send = msg.seq, self.send

        def emit(event: Any) -> None:  # on the runtime's callback thread
            send(Token(seq, event.token_id, event.text, int(event.state), event.at))

        try:
            try:
                finish = self.session.run(msg.inp, emit, cancelled)
            except BaseException as exc:  # noqa: BLE001
                send(Failed(seq, RemoteError.of(exc), self.session.kv_cache_len()))
            else:
                send(Finished(seq, finish, self.session.kv_cache_len()))
        except OSError:
            pass  # exo is gone; serve() notices and stops

    def _shutdown(self) -> None:
        """Stop the NPU and release the runtime; never hang on the way out."""
        self.session.abort()
        if self._gen_thread is not None:
            self._gen_thread.join(timeout=SHUTDOWN_RUN_EXIT_S)
        closer = threading.Thread(target=self.session.close, name="rkllm-close", daemon=True)
        closer.start()
        closer.join(timeout=SHUTDOWN_DESTROY_S)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="exo-rkllm native runtime worker (started by exo-rkllm)")
    parser.add_argument("--fd", type=int, required=True, help="file descriptor of the socket to exo")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    faulthandler.enable()  # a crash in the runtime prints the Python stacks before the process dies
    level = getattr(logging, os.environ.get("RKLLM_LOG_LEVEL", "INFO").strip().upper(), logging.INFO)
    logging.basicConfig(level=level if isinstance(level, int) else logging.INFO,
                        format="exo-rkllm worker %(process)d: %(levelname)s %(message)s", stream=sys.stderr)
    conn = Connection(args.fd)
    try:
        configure = conn.recv()
    except (EOFError, OSError):
        return 1
    if not isinstance(configure, Configure):
        return 1
    try:
        session = NativeSession(RKLLMLibrary(configure.identity), configure.settings)
    except BaseException as exc:  # noqa: BLE001
        conn.send(Hello(os.getpid(), RemoteError.of(exc)))
        return 2
    conn.send(Hello(os.getpid()))
    Worker(conn, session).serve()
    return 0


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # do not wait for runtime threads the library may have left behind
