"""`SilentServer`: a TCP server on 127.0.0.1 that accepts connections and never answers.

What a hung endpoint looks like to a client: the connection succeeds, the request is sent, and no byte
ever comes back, so only the client's read timeout ends the call. `stop` closes every connection it
holds (the clients then see a reset) and the listening socket.
"""

from __future__ import annotations

import selectors
import socket
import threading

__all__ = ["SilentServer"]


class SilentServer:
    """Accepts up to ``max_connections`` connections on 127.0.0.1 and holds them open without reading
    or answering anything (once the kernel's buffers are full, a client's sends stall as well). A context manager; `url` is ``http://127.0.0.1:<port>``.

    Example:
        >>> with SilentServer() as server:
        ...     conn = socket.create_connection(("127.0.0.1", server.port), timeout=0.2)
        ...     conn.sendall(b"GET / HTTP/1.1\\r\\nHost: x\\r\\n\\r\\n")
        ...     try:
        ...         conn.recv(1)
        ...     except socket.timeout:
        ...         print("no answer")
        ...     conn.close()
        no answer
    """

    def __init__(self, *, max_connections: int = 256) -> None:
        self.max_connections = max_connections
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(64)
        self._sock.setblocking(False)
        self.port = int(self._sock.getsockname()[1])
        self.accepted = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "SilentServer":
        if self._thread is None:
            self._thread = threading.Thread(target=self._serve, name="silent-server", daemon=True)
            self._thread.start()
        return self

    def _serve(self) -> None:
        sel = selectors.DefaultSelector()
        sel.register(self._sock, selectors.EVENT_READ)
        conns: list[socket.socket] = []
        try:
            while not self._stop.is_set():
                for key, _ in sel.select(timeout=0.05):
                    if key.fileobj is self._sock:
                        try:
                            conn, _addr = self._sock.accept()
                        except BlockingIOError:
                            continue
                        if len(conns) >= self.max_connections:
                            conn.close()
                            continue
                        conns.append(conn)  # held open, never read: the client's sends stall too
                        self.accepted += 1
        finally:
            for conn in conns:
                conn.close()
            sel.close()
            self._sock.close()

    def stop(self) -> None:
        """Close every connection and the listening socket; wait for the server thread."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        else:
            self._sock.close()

    def __enter__(self) -> "SilentServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
