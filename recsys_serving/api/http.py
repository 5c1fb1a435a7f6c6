"""The HTTP/1.1 protocol the servers run: uvicorn's, with JSON errors before the app.

uvicorn's parser refuses a malformed request, or one whose request line and headers
pass its limit (about 64 KiB: a long ``exclude`` list), with a ``text/plain`` 400
before any application code runs. Every error of this service is JSON, so these
subclasses answer that 400 in the same ``{"error", "detail"}`` shape; everything
else is uvicorn's. Servers select it with ``http=UVICORN_HTTP`` (an import string,
so ``--workers N`` child processes load it too).
"""

from __future__ import annotations

import orjson
from uvicorn.protocols.http.h11_impl import H11Protocol

try:
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
except ImportError:  # pragma: no cover - httptools is part of uvicorn[standard]
    HttpToolsProtocol = None  # type: ignore[assignment,misc]

BAD_REQUEST_DETAIL = (
    "malformed HTTP request, or a request line and headers larger than the server "
    "accepts (about 64 KiB; send long lists in fewer or shorter parameters)"
)


def bad_request_bytes(default_headers: list[tuple[bytes, bytes]]) -> bytes:
    """A complete ``400`` response with a JSON body; the connection closes after it."""
    body = orjson.dumps({"error": "bad_request", "detail": BAD_REQUEST_DETAIL})
    head = [b"HTTP/1.1 400 Bad Request\r\n"]
    for name, value in default_headers:
        head += [name, b": ", value, b"\r\n"]
    head += [
        b"content-type: application/json\r\n",
        b"content-length: " + str(len(body)).encode("ascii") + b"\r\n",
        b"connection: close\r\n\r\n",
    ]
    return b"".join(head) + body


class JsonErrorsH11Protocol(H11Protocol):
    """uvicorn's h11 protocol, answering unparseable requests in JSON."""

    def send_400_response(self, msg: str) -> None:
        self.transport.write(bad_request_bytes(self.server_state.default_headers))
        self.transport.close()


if HttpToolsProtocol is not None:

    class JsonErrorsHttpToolsProtocol(HttpToolsProtocol):
        """uvicorn's httptools protocol, answering unparseable requests in JSON."""

        def send_400_response(self, msg: str) -> None:
            self.transport.write(bad_request_bytes(self.server_state.default_headers))
            self.transport.close()

    UVICORN_HTTP = "recsys_serving.api.http:JsonErrorsHttpToolsProtocol"
else:  # pragma: no cover
    UVICORN_HTTP = "recsys_serving.api.http:JsonErrorsH11Protocol"

__all__ = ["UVICORN_HTTP", "JsonErrorsH11Protocol", "bad_request_bytes"]
