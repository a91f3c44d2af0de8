"""Running an app under uvicorn on a socket the caller bound, with a draining shutdown."""

from __future__ import annotations

import logging
import signal
import socket
from typing import Any

import uvicorn
from fastapi import FastAPI

log = logging.getLogger("mistral7b.server")


class DrainingServer(uvicorn.Server):
    """uvicorn's server, telling the scheduler to drain as soon as a signal arrives.

    uvicorn then stops accepting connections and waits for open responses; the scheduler
    lets running requests finish for shutdown_grace seconds and ends the rest with an error,
    so every response ends and the process exits.
    """

    def __init__(self, config: uvicorn.Config, state: Any) -> None:
        super().__init__(config)
        self.state = state

    def handle_exit(self, sig: int, frame: Any) -> None:
        if not self.should_exit:
            log.info("received %s: no new requests; finishing running ones (up to %g s)",
                     signal.Signals(sig).name, self.state.settings.shutdown_grace)
            self.state.drain()
        super().handle_exit(sig, frame)


def serve(app: FastAPI, sock: socket.socket, *, log_level: str = "info",
          access_log: bool = True) -> DrainingServer:
    """Serve until SIGTERM/SIGINT (or server.should_exit). Returns the stopped server.

    A SIGTERM ends the process normally (the caller returns 0): uvicorn re-raises the signal
    that stopped it once it is done, so a no-op handler is in place while it runs. SIGINT
    keeps Python's handler and surfaces as KeyboardInterrupt after the graceful stop.
    """
    state = app.state.server
    config = uvicorn.Config(app, log_level=log_level, access_log=access_log, lifespan="on",
                            timeout_graceful_shutdown=state.settings.shutdown_grace + 5)
    server = DrainingServer(config, state)
    state.stop_server = lambda: setattr(server, "should_exit", True)
    previous = signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        server.run(sockets=[sock])
    finally:
        signal.signal(signal.SIGTERM, previous)
    return server
