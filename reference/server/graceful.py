"""uvicorn's Server with our shutdown order: end the requests in flight first, then exit with status 0.

uvicorn alone would, on SIGTERM, wait for every open stream to finish on its own (a long generation keeps its
connection open), and after its graceful shutdown it re-raises the signal, so the process dies of SIGTERM.
"""

from __future__ import annotations

import contextlib
import signal
import threading

import uvicorn

from .engine_thread import EngineThread


class GracefulServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, engine_thread: EngineThread) -> None:
        super().__init__(config)
        self.engine_thread = engine_thread

    async def shutdown(self, sockets=None) -> None:
        # Abort what is in flight: non-streamed requests get a 503, streams an error event and [DONE], so their
        # connections close now; uvicorn then runs the app's shutdown, which joins the engine thread.
        self.engine_thread.begin_shutdown()
        await super().shutdown(sockets)

    @contextlib.contextmanager
    def capture_signals(self):
        """Route SIGINT / SIGTERM to handle_exit while serving, and restore the old handlers without re-raising."""
        if threading.current_thread() is not threading.main_thread():  # signals only reach the main thread
            yield
            return
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
