"""Typed errors of the model layer, and the HTTP status of each ``code``: the ingress answers with it, and the
stages tell a client's error (a 4xx: a bad value, an unknown model, a cancel) from their own failure by it, for
their metrics, without importing the ingress."""

from __future__ import annotations

from typing import Literal

STATUS = {
    "INVALID_INPUT": 422,
    "INVALID_IMAGE": 400,
    "UNKNOWN_MODEL": 422,
    "NOT_FOUND": 404,
    "RESULT_EXPIRED": 410,
    "UNAUTHORIZED": 401,
    "CANCELLED": 409,
    "CONFLICT": 409,
    "CONTENT_FLAGGED": 422,
    "QUEUE_FULL": 429,
    "RATE_LIMITED": 429,
    "PAYLOAD_TOO_LARGE": 413,
    "REQUEST_TIMEOUT": 408,
    "GPU_OOM": 503,
    "MODEL_UNAVAILABLE": 503,
    "STORAGE_UNAVAILABLE": 503,
    "STREAMS_BUSY": 503,
    "MODEL_LOAD_FAILED": 503,
    "SIGNING_FAILED": 503,
}


class ServiceError(Exception):
    """Base of every error the service reports to clients: a stable ``code`` plus the offending ``field``."""

    code = "INTERNAL_ERROR"

    def __init__(self, message: str, *, field: str | None = None, details: dict | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field
        self.details = dict(details or {})
        if field is not None:
            self.details.setdefault("field", field)


class InvalidInput(ServiceError, ValueError):
    """A request value is out of bounds, malformed or inconsistent with another value."""

    code = "INVALID_INPUT"


class InvalidImage(InvalidInput):
    """An image could not be decoded, is of a refused format, or is too large."""

    code = "INVALID_IMAGE"


class UnknownModel(InvalidInput):
    """A named model, LoRA, sampler or upscaler is not registered."""

    code = "UNKNOWN_MODEL"


class ModelLoadError(ServiceError):
    """Weights could not be found, fetched or parsed."""

    code = "MODEL_LOAD_FAILED"


class UnsafeWeights(ModelLoadError):
    """A pickled checkpoint (.ckpt, .pt, .pth, .bin) was offered: only safetensors are loaded."""

    code = "UNSAFE_WEIGHTS"


class DownloadIncomplete(ModelLoadError):
    """A remote object arrived shorter (or longer) than its advertised size."""

    code = "DOWNLOAD_INCOMPLETE"


class ModelUnavailable(ServiceError):
    """A model the request needs is not loaded on this replica."""

    code = "MODEL_UNAVAILABLE"


class GenerationCancelled(ServiceError):
    """The caller cancelled the work; raised between denoising steps."""

    code = "CANCELLED"


class NotFound(ServiceError):
    """A job, photo or other named resource does not exist (or is not the caller's)."""

    code = "NOT_FOUND"


class ResultExpired(NotFound):
    """A finished job's image is gone (its retention, a bucket's lifecycle rule, a lost disk): the job is there."""

    code = "RESULT_EXPIRED"


class Unauthorized(ServiceError):
    code = "UNAUTHORIZED"


class StorageUnavailable(ServiceError):
    """Object storage could not be reached or refused the operation; the request may be retried."""

    code = "STORAGE_UNAVAILABLE"


class JobConflict(ServiceError):
    """The job is not in a state that allows this (a result before completion, cancelling a finished job)."""

    code = "CONFLICT"


class StreamsBusy(ServiceError):
    """An ingress replica serves as many event streams as it may; the job can be polled meanwhile."""

    code = "STREAMS_BUSY"


class QueueFull(ServiceError):
    """The job queue is at MAX_QUEUE_SIZE."""

    code = "QUEUE_FULL"


class ContentFlagged(ServiceError):
    """The safety checker flagged the image, which is therefore neither returned nor stored."""

    code = "CONTENT_FLAGGED"


class GpuOutOfMemory(ServiceError):
    """The accelerator ran out of memory; the request may be retried."""

    code = "GPU_OOM"


def status_of(error: ServiceError) -> int:
    """The status of the error's own code, else of the nearest base class's (an ``UnsafeWeights`` is a
    ``ModelLoadError``); 500 for none."""
    for cls in type(error).__mro__:
        code = getattr(cls, "code", None)
        if code in STATUS:
            return STATUS[code]
    return 500


Kind = Literal["client", "server"]


def kind_of(error: BaseException) -> Kind:
    """``client`` for what the request brought on itself (a 4xx: a bad value, an unknown model, a cancel),
    ``server`` for the rest, an exception without a code included: only those want an operator's attention."""
    return "client" if isinstance(error, ServiceError) and status_of(error) < 500 else "server"
