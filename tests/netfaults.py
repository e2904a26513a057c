"""A loopback TCP proxy that injects network faults between the service and a real server (S3 on loopback).

Faults, applied to the next ``faults`` connections (``None``: every one):
- ``refuse``: close the connection at once (server down);
- ``reset``: read the request, then reset the connection (RST) without answering;
- ``cut_upload``: forward only ``upload_budget`` bytes of the request, then drop both sides (a broken upload);
- ``cut_download``: forward only ``budget`` bytes of the response (a dropped download);
- ``stall``: accept and read, never answer (a hung server: the client must time out);
- ``http_500``: answer ``500 InternalError`` in S3's XML without reaching the server.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
import time

_ERROR = b'<?xml version="1.0"?><Error><Code>InternalError</Code><Message>injected</Message></Error>'
S3_500 = (b"HTTP/1.1 500 Internal Server Error\r\nContent-Type: application/xml\r\nConnection: close\r\n"
          b"Content-Length: %d\r\n\r\n%s" % (len(_ERROR), _ERROR))


class TruncatingProxy:
    """``budget`` cuts every response; ``broken = True`` refuses new connections; ``fault`` injects the others."""

    def __init__(self, upstream: tuple[str, int], budget: int | None = None) -> None:
        self.upstream, self.budget = upstream, budget
        self.broken = False
        self.fault: str | None = None
        self.faults: int | None = None  # how many connections still get the fault; None: all
        self.upload_budget = 0
        self.connections = 0
        self.faulted = 0
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self._stop = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def inject(self, fault: str | None, faults: int | None = None, upload_budget: int = 0) -> None:
        self.fault, self.faults, self.upload_budget = fault, faults, upload_budget

    def _take_fault(self) -> str | None:
        if self.broken:
            return "refuse"
        if self.fault is None or self.faults == 0:
            return "cut_download" if self.budget is not None else None
        if self.faults is not None:
            self.faults -= 1
        self.faulted += 1
        return self.fault

    def _accept(self) -> None:
        self.listener.settimeout(0.2)
        while not self._stop.is_set():
            try:
                client, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:  # closed by close()
                return
            self.connections += 1
            threading.Thread(target=self._serve, args=(client, self._take_fault()), daemon=True).start()

    def _serve(self, client: socket.socket, fault: str | None) -> None:
        if fault == "refuse":
            client.close()
            return
        if fault in ("reset", "stall", "http_500"):
            with contextlib.suppress(OSError):
                client.settimeout(5)
                client.recv(65536)
                if fault == "http_500":
                    client.sendall(S3_500)
                elif fault == "stall":
                    time.sleep(30)
            if fault == "reset":  # SO_LINGER 0: close sends RST
                client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            client.close()
            return
        server = socket.create_connection(self.upstream)
        up = self.upload_budget if fault == "cut_upload" else None
        down = self.budget if fault == "cut_download" else None
        threading.Thread(target=self._pipe, args=(client, server, up), daemon=True).start()
        threading.Thread(target=self._pipe, args=(server, client, down), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket, budget: int | None) -> None:
        sent = 0
        try:
            while data := src.recv(65536):
                if budget is not None and sent + len(data) > budget:
                    dst.sendall(data[: budget - sent])
                    break
                dst.sendall(data)
                sent += len(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                s.close()

    def close(self) -> None:
        self._stop.set()
        self.listener.close()
