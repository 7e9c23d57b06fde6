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

from lib.datalists import PairCheckError
from lib.datastore import UploadRejected
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


def install_error_handlers(app: FastAPI) -> None:
    """Register the handlers; the middleware stack is rebuilt on the next request to pick them up."""
    for error_type in HANDLED:
        app.add_exception_handler(error_type, _handle)
    app.middleware_stack = None
