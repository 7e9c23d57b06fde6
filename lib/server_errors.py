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


DRAIN_BYTES = 4 * 2**30


class UploadSizeLimit:
    """Refuse request bodies above ``max_bytes`` with a 413 before they reach disk.

    A declared Content-Length is checked before anything is read. A chunked body is counted as it
    streams and cut off at the limit; whatever the endpoint then answers (FastAPI turns the aborted
    read into a 400) is replaced by the 413. The datastore checks the saved file again.
    """

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app, self.max_bytes = app, int(max_bytes)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send, size: str) -> None:
        """Read the rest of the body into nothing (clients that are still sending then see the answer
        rather than a broken pipe; at most ``DRAIN_BYTES``), then answer 413."""
        drained = 0
        while drained < DRAIN_BYTES:
            message = await receive()
            drained += len(message.get("body", b""))
            if message["type"] != "http.request" or not message.get("more_body"):
                break
        await self._refusal(scope, size)(scope, receive, send)

    def _refusal(self, scope: Scope, size: str) -> JSONResponse:
        query = scope.get("query_string", b"").decode(errors="replace")
        target = scope.get("path", "") + (f"?{query}" if query else "")
        message = (f"upload to {scope.get('method', '')} {target} is {size}, above the "
                   f"{self.max_bytes / 2**20:g} MB limit (conf max_upload_mb); nothing was saved")
        log.warning("%s -> 413", message)
        return JSONResponse(status_code=413, content={"detail": message, "error": "UploadTooLarge"})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._refuse(scope, receive, send, f"{int(declared) / 2**20:.1f} MB")
            return
        received, refused = 0, False

        async def counting_receive() -> Message:
            nonlocal received, refused
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                refused = True
                raise UploadTooLarge(f"more than {received / 2**20:.1f} MB")
            return message

        async def guarded_send(message: Message) -> None:
            if not refused:
                await send(message)
            elif message["type"] == "http.response.start":  # the endpoint's answer to the cut-off body
                await self._refuse(scope, receive, send, f"more than {received / 2**20:.1f} MB")

        try:
            await self.app(scope, counting_receive, guarded_send)
        except UploadTooLarge:
            await self._refuse(scope, receive, send, f"more than {received / 2**20:.1f} MB")


def install_error_handlers(app: FastAPI, max_upload_bytes: int | None = None) -> None:
    """Register the handlers (and the upload limit); the middleware stack is rebuilt on the next request."""
    for error_type in HANDLED:
        app.add_exception_handler(error_type, _handle)
    app.middleware_stack = None
    if max_upload_bytes is not None:
        app.user_middleware = [m for m in app.user_middleware if m.cls is not UploadSizeLimit]
        app.add_middleware(UploadSizeLimit, max_bytes=max_upload_bytes)
