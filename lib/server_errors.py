"""Turn user mistakes into HTTP 4xx answers with a message, instead of MONAI Label's 500s.

MONAI Label's endpoints let every exception escape as a 500 with a traceback in the log. The app
registers these handlers on the running FastAPI instance; the server keeps serving either way.
"""

from __future__ import annotations

import json
import logging

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from monailabel.interfaces.exception import (
    ImageNotFoundException,
    LabelNotFoundException,
    MONAILabelError,
    MONAILabelException,
)
from starlette.middleware import Middleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from lib.datalists import PairCheckError
from lib.datastore import UploadRejected, UploadTooLarge
from lib.model_store import ModelNotReady
from lib.trainers.engine import TrainingError
from lib.trainers.train_task import TrainingBusy
from lib.transforms import CTInputError
from lib.volumes import VolumeReadError

log = logging.getLogger(__name__)


def status_for(error: Exception) -> int:
    if isinstance(error, ImageNotFoundException | LabelNotFoundException):
        return 404
    if isinstance(error, MONAILabelException):
        unknown_task = error.error in (MONAILabelError.INVALID_INPUT, MONAILabelError.APP_INIT_ERROR)
        return 404 if unknown_task and ("no model" in error.msg.lower() or "no such" in error.msg.lower()) else 400
    if isinstance(error, UploadRejected):
        return error.status_code
    if isinstance(error, ModelNotReady | TrainingBusy):
        return 409
    if isinstance(error, json.JSONDecodeError):
        return 400
    return 422  # CTInputError, PairCheckError, VolumeReadError, TrainingError: the input is the problem


def message_for(error: Exception) -> str:
    if isinstance(error, MONAILabelException):
        return error.msg
    if isinstance(error, json.JSONDecodeError):
        return f"malformed JSON in request parameters: {error}"
    return str(error)


async def _handle(request: Request, error: Exception) -> JSONResponse:
    status = status_for(error)
    message = message_for(error)
    log.warning("%s %s -> %d: %s", request.method, request.url.path, status, message)
    return JSONResponse(status_code=status, content={"detail": message, "error": type(error).__name__})


HANDLED = (
    MONAILabelException, UploadRejected, CTInputError, PairCheckError, VolumeReadError, TrainingError, TrainingBusy,
    ModelNotReady, json.JSONDecodeError,
)


DRAIN_BYTES = 256 * 2**20


class UploadSizeLimit:
    """Refuse request bodies above ``max_bytes`` with a 413 (JSON, with the request and the limit).

    A declared Content-Length is judged before the body is read; a client that asked for
    ``100-continue`` is answered before it sends anything. A chunked body is counted as it streams and
    cut off at the limit; the endpoint's answer to the cut-off read (FastAPI makes it a 400) is replaced
    by the 413. Before answering, up to ``DRAIN_BYTES`` of the unread body are read into nothing, so a
    client still sending sees the answer rather than a broken pipe. The datastore checks the saved size
    again. Installed innermost, so CORS headers still wrap the 413.
    """

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app, self.max_bytes = app, int(max_bytes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        await _LimitedRequest(self, scope, receive, send).run()

    def refusal(self, scope: Scope, size: str) -> JSONResponse:
        query = scope.get("query_string", b"").decode(errors="replace")
        target = scope.get("path", "") + (f"?{query}" if query else "")
        message = (f"upload to {scope.get('method', '')} {target} is {size}, above the "
                   f"{self.max_bytes / 2**20:g} MB limit (conf max_upload_mb); nothing was saved")
        log.warning("%s -> 413", message)
        return JSONResponse(status_code=413, content={"detail": message, "error": "UploadTooLarge"})


class _LimitedRequest:
    """One request's pass through :class:`UploadSizeLimit`."""

    def __init__(self, limit: UploadSizeLimit, scope: Scope, receive: Receive, send: Send):
        self.limit, self.scope, self._receive, self._send = limit, scope, receive, send
        self.headers = dict(scope.get("headers") or [])
        self.received, self.body_done, self.refused, self.answered = 0, False, False, False

    async def run(self) -> None:
        declared = self.headers.get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.limit.max_bytes:
            self.refused = True
            await self.answer(f"{int(declared) / 2**20:.1f} MB")
            return
        try:
            await self.limit.app(self.scope, self.receive, self.send)
        except UploadTooLarge:
            if not self.answered:
                await self.answer(f"more than {self.received / 2**20:.1f} MB")

    async def receive(self) -> Message:
        message = await self._receive()
        self.received += len(message.get("body", b""))
        self.body_done = message["type"] != "http.request" or not message.get("more_body", False)
        if self.received > self.limit.max_bytes:
            self.refused = True
            raise UploadTooLarge(f"more than {self.received / 2**20:.1f} MB")
        return message

    async def send(self, message: Message) -> None:
        if not self.refused:
            await self._send(message)
        elif message["type"] == "http.response.start" and not self.answered:  # the answer to the cut-off read
            await self.answer(f"more than {self.received / 2**20:.1f} MB")

    async def answer(self, size: str) -> None:
        self.answered = True
        continue_expected = self.headers.get(b"expect", b"").lower() == b"100-continue" and not self.received
        drained = 0
        while not (self.body_done or continue_expected) and drained < DRAIN_BYTES:
            message = await self._receive()  # never call receive() after the last chunk: it waits for a disconnect
            drained += len(message.get("body", b""))
            self.body_done = message["type"] != "http.request" or not message.get("more_body", False)
        await self.limit.refusal(self.scope, size)(self.scope, self._receive, self._send)


def install_error_handlers(app: FastAPI, max_upload_bytes: int | None = None) -> None:
    """Register the handlers (and the upload limit, innermost); the middleware stack is rebuilt next request."""
    for error_type in HANDLED:
        app.add_exception_handler(error_type, _handle)
    app.middleware_stack = None
    app.user_middleware = [m for m in app.user_middleware if m.cls is not UploadSizeLimit]
    if max_upload_bytes is not None:
        app.user_middleware.append(Middleware(UploadSizeLimit, max_bytes=max_upload_bytes))
