"""A fault-injecting HTTP proxy in front of a storage emulator (Azurite,
gcp-storage-emulator): every byte still comes from the emulator; the test says which
ranged reads fail or crawl (the emulators themselves never fail)."""

from __future__ import annotations

import http.client
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from tests.peers import free_port


@dataclass
class Faults:
    """What the proxy does to ranged reads: fail the read of a range starting at an offset
    N times (503), flip a byte of it, or delay every ranged read; and to Azure's page
    range listings (Get Page Ranges, `comp=pagelist`): one over more than
    `page_list_span` bytes (or the whole blob) times out as on a large fragmented blob
    (500 OperationTimedOut), the first `page_list_fail` ones answer 503."""

    fail: dict[int, int] = field(default_factory=dict)  # range start -> failures left
    corrupt: set[int] = field(default_factory=set)  # range starts answered with a byte flipped
    delay: float = 0.0
    page_list_span: int | None = None
    page_list_fail: int = 0
    reads: int = 0  # ranged reads of data served
    page_lists: list[str] = field(default_factory=list)  # ranges of listings within the span
    lock: threading.Lock = field(default_factory=threading.Lock)

    def should_fail(self, start: int) -> bool:
        with self.lock:
            left = self.fail.get(start, 0)
            if left:
                self.fail[start] = left - 1
            return left > 0


def start_proxy(upstream_port: int, faults: Faults) -> ThreadingHTTPServer:
    """An HTTP proxy to the emulator on `upstream_port`; `faults` says which ranged reads
    fail (503) or crawl."""

    class Proxy(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: Any) -> None:
            pass

        def _refuse(self, status: int, code: str, message: str) -> None:
            body = (f'<?xml version="1.0" encoding="utf-8"?><Error><Code>{code}</Code>'
                    f"<Message>{message}</Message></Error>").encode()
            self.send_response(status)
            self.send_header("x-ms-error-code", code)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _page_list_refused(self, ranged: str) -> bool:
            span = None
            if ranged.startswith("bytes="):
                first, _, last = ranged[6:].partition("-")
                span = int(last) - int(first) + 1
            if faults.page_list_span is not None and (
                    span is None or span > faults.page_list_span):
                self._refuse(500, "OperationTimedOut",
                             "Operation could not be completed within the specified time.")
                return True
            with faults.lock:
                faults.page_lists.append(ranged)
                if faults.page_list_fail > 0:
                    faults.page_list_fail -= 1
                    self._refuse(503, "ServerBusy", "The server is busy.")
                    return True
            return False

        def _forward(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            ranged = self.headers.get("x-ms-range") or self.headers.get("Range") or ""
            if self.command == "GET" and "comp=pagelist" in self.path:
                if self._page_list_refused(ranged):
                    return
            elif self.command == "GET" and ranged.startswith("bytes="):
                with faults.lock:
                    faults.reads += 1
                if faults.delay:
                    time.sleep(faults.delay)
                if faults.should_fail(int(ranged[6:].split("-")[0])):
                    self.send_response(503)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
            upstream = http.client.HTTPConnection("127.0.0.1", upstream_port, timeout=60)
            try:
                headers = {k: v for k, v in self.headers.items() if k.lower() != "host"}
                headers["Host"] = f"127.0.0.1:{upstream_port}"
                upstream.request(self.command, self.path, body=body or None, headers=headers)
                answer = upstream.getresponse()
                data = answer.read()
                if (self.command == "GET" and ranged.startswith("bytes=") and data
                        and int(ranged[6:].split("-")[0]) in faults.corrupt):
                    data = bytes([data[0] ^ 0xFF]) + data[1:]
                self.send_response(answer.status)
                head = self.command == "HEAD"  # its Content-Length is the blob's
                for key, value in answer.getheaders():
                    if key.lower() not in ("transfer-encoding", "connection") and (
                            head or key.lower() != "content-length"):
                        self.send_header(key, value)
                if not head:
                    self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
            finally:
                upstream.close()

        do_GET = do_PUT = do_HEAD = do_DELETE = do_POST = _forward  # noqa: N815

    server = ThreadingHTTPServer(("127.0.0.1", free_port()), Proxy)
    threading.Thread(target=server.serve_forever, daemon=True, name="fault-proxy").start()
    return server
