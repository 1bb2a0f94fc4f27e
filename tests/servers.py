"""Helpers shared by the tests that run misbehaving HTTP servers on 127.0.0.1."""

from __future__ import annotations

import contextlib
import threading
import time


@contextlib.contextmanager
def serving(server):
    """Run ``server`` (a ``socketserver`` server bound to 127.0.0.1) in a daemon thread for the
    ``with`` block, then shut it down, close its socket and join the thread."""
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def write_slowly(wfile, data: bytes, delay: float = 0.05) -> None:
    """Send ``data`` a byte at a time, ``delay`` seconds apart: each byte arrives well inside a
    per-read socket timeout, so only a deadline on the whole request stops the client waiting.
    A client that hangs up ends the writing (that is what the deadline is for)."""
    try:
        for byte in data:
            wfile.write(bytes([byte]))
            time.sleep(delay)
    except OSError:
        pass
