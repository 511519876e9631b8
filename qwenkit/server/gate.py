"""What every request meets before routing: the transport's limits, credentials, the body, and a last
catch for errors.

`Gate` is ASGI middleware: it counts responses by status for /metrics, checks credentials on the API
paths, reads the whole body within the request timeout and the size limit, and answers an error no
route caught with a 500 naming it (keeping the connection). `http_protocol` is uvicorn's h11 protocol
with two limits uvicorn lacks: a request's head must arrive within the request timeout, and a head
over the size limit gets a 431.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hmac
import json
import logging

import h11
from starlette.responses import JSONResponse
from uvicorn.protocols.http.h11_impl import H11Protocol

from .protocol import APIError, error_body

log = logging.getLogger("uvicorn.error")

PROTECTED = ("/v1/", "/tokenize", "/detokenize", "/metrics")  # /health, /openapi.json and the web page stay open
DRAIN_BYTES = 64 << 20  # of an oversized body, read before answering 413; a larger one gets a reset


def error_response(error: APIError) -> JSONResponse:
    return JSONResponse(error.body(), error.status, headers=error.headers)


class Gate:
    def __init__(self, app, service):
        self.app, self.service = app, service
        s = service.settings
        self.bearer = [x for x in (s.api_key, s.api_auth and _basic(s.api_auth)) if x]
        # HTTP Basic carries USER:PASS only. As a Bearer token it is accepted too, as the Qwen-7B scripts'
        # --api-auth does: the openai client can send nothing but a Bearer key.
        self.basic = [_basic(s.api_auth)] if s.api_auth else []
        self.challenge = 'Basic realm="qwenkit"' if s.api_auth else "Bearer"
        ways = [way for way, on in (("'Authorization: Bearer API_KEY'", s.api_key),
                                    ("HTTP Basic USER:PASS", s.api_auth)) if on]
        self.refusal = f"missing or wrong credentials: send {' or '.join(ways)}"

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def counting_send(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                self.service.responses[message["status"]] += 1
            await send(message)

        async def refuse(error: APIError):
            await error_response(error)(scope, receive, counting_send)

        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if (self.bearer or self.basic) and scope["path"].startswith(PROTECTED) and not self._authorized(headers):
            return await refuse(APIError(401, self.refusal, code="invalid_api_key",
                                         headers={"WWW-Authenticate": self.challenge}))
        settings = self.service.settings
        try:
            body = await asyncio.wait_for(self._read_body(headers, receive), settings.request_timeout)
        except asyncio.TimeoutError:
            return await refuse(APIError(408, f"the request body did not arrive within {settings.request_timeout:g} s "
                                              "(--request-timeout)", code="request_timeout",
                                         headers={"Connection": "close"}))
        if body is None:
            # Read the rest first (within bounds): closing a socket with unread data resets the
            # connection, and the client would see that instead of this answer.
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(_drain(receive, DRAIN_BYTES), settings.request_timeout)
            return await refuse(APIError(413, f"the request body is larger than the limit of "
                                              f"{settings.max_body_bytes} bytes (--max-body-bytes)",
                                         code="request_too_large", headers={"Connection": "close"}))
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: the disconnect the routes watch for

        try:
            await self.app(scope, replay, counting_send)
        except Exception as e:
            log.exception("%s %s failed", scope["method"], scope["path"])
            if started:  # too late for a status: the stream just ends
                raise
            await refuse(APIError(500, f"internal error: {type(e).__name__}: {e}"))

    def _authorized(self, headers: dict[str, str]) -> bool:
        scheme, _, credential = headers.get("authorization", "").strip().partition(" ")
        accepted = {"bearer": self.bearer, "basic": self.basic}.get(scheme.lower(), [])
        credential = credential.strip().encode()
        return any(hmac.compare_digest(credential, secret.encode()) for secret in accepted)

    async def _read_body(self, headers: dict[str, str], receive) -> bytes | None:
        """The whole body, or None when it is over the limit (by its Content-Length, or as read)."""
        limit = self.service.settings.max_body_bytes
        declared = headers.get("content-length", "")
        if declared.isascii() and declared.isdigit() and int(declared) > limit:
            return None
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left before sending it all
                return b""
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > limit:
                return None
            if not message.get("more_body"):
                return b"".join(chunks)


async def _drain(receive, limit: int) -> None:
    """Read and drop what is left of a request body, up to `limit` bytes."""
    while limit > 0:
        message = await receive()
        if message["type"] != "http.request" or not message.get("more_body"):
            return
        limit -= len(message.get("body", b""))


def _basic(user_pass: str) -> str:
    return base64.b64encode(user_pass.encode()).decode()


def http_protocol(service) -> type[H11Protocol]:
    """uvicorn's h11 protocol, bounded by `service.settings`: a request head must arrive within
    request_timeout seconds of the connection (or of the last response on it), and a head longer
    than max_header_bytes is answered 431; both close the connection."""
    settings = service.settings

    class Protocol(H11Protocol):
        _head_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport):
            super().connection_made(transport)
            self._arm_head_timer()

        def connection_lost(self, exc):
            self._disarm_head_timer()
            super().connection_lost(exc)

        def on_response_complete(self):
            super().on_response_complete()
            self._arm_head_timer()

        def data_received(self, data: bytes):
            if self.conn.their_state is h11.IDLE:  # still reading a head (the data may run into the body)
                limit = settings.max_header_bytes
                received = self.conn.trailing_data[0] + data
                if received.find(b"\r\n\r\n", 0, limit + 4) < 0 and len(received) > limit:
                    return self._refuse(431, f"the request's head is longer than {limit} bytes (--max-header-bytes)")
            super().data_received(data)

        def _arm_head_timer(self):
            self._disarm_head_timer()
            self._head_timer = self.loop.call_later(settings.request_timeout, self._head_timed_out)

        def _disarm_head_timer(self):
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _head_timed_out(self):
            if self.conn.their_state is not h11.IDLE or self.transport.is_closing():
                return  # the head arrived: the body has its own deadline in the Gate
            if self.conn.trailing_data[0]:  # part of a head: say why
                self._refuse(408, f"the request's head did not arrive within {settings.request_timeout:g} s "
                                  "(--request-timeout)")
            else:
                self.transport.close()

        def _refuse(self, status: int, message: str):
            body = json.dumps(error_body(status, message)).encode()
            reason = {408: b"Request Timeout", 431: b"Request Header Fields Too Large"}[status]
            self.transport.write(b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
                                 b"connection: close\r\n\r\n%s" % (status, reason, len(body), body))
            service.responses[status] += 1
            self.transport.close()

    return Protocol
