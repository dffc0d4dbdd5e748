"""What can go wrong between an upload and its prediction or explanation; each message says what happened and
what to do.

The HTTP status of each is decided in one place, ``app/api/errors.py``.
"""

from __future__ import annotations


class ServingError(Exception):
    """An expected failure of one request; the service itself is fine."""


class ImageError(ServingError):
    """The bytes sent are not an image this service can use."""


class EmptyImage(ImageError):
    pass


class UnsupportedImage(ImageError):
    pass


class ImageTooLarge(ImageError):
    pass


class NoModelLoaded(ServingError):
    pass


class QueueFull(ServingError):
    def __init__(self, message: str, retry_after_s: int) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class DeadlineExceeded(ServingError):
    pass


class ServiceStopping(ServingError):
    pass


class InferenceFailed(ServingError):
    """A forward pass raised; only the requests of that batch fail."""


class InputSizeChanged(ServingError):
    """A model of another input size took over before any of the request's images was computed; ``size`` is
    the new one. The classification pipeline fits the images again; a v2 client must resend."""

    def __init__(self, message: str, size: int) -> None:
        super().__init__(message)
        self.size = size


class SwapFailed(ServingError):
    """A checkpoint that was read could not be served (its backend failed to build or warm up); the previous
    model keeps serving."""


class SwapTimedOut(SwapFailed):
    """A swap did not finish within its timeout; the previous model keeps serving."""


class NonFiniteOutput(InferenceFailed):
    """The model computed NaN or infinite logits: its weights are broken (a diverged training run), and no
    answer made of them may be served."""


class DecodeQueueFull(QueueFull):
    pass


class UploadBudgetExceeded(QueueFull):
    """The request bodies being read together would hold more than ``APP_MAX_UPLOAD_BYTES_IN_FLIGHT``."""


class ExplainerBusy(ServingError):
    """Every explain slot is in use (``app/classification/explanations.py``)."""

    retry_after_s = 1  # one Grad-CAM of a 32x32 image takes tens of milliseconds (benchmarks/explain_latency.py)


class UnknownClass(ServingError):
    """``?class=`` names no class of the serving model."""


class ExplanationUnavailable(ServingError):
    """The serving model's checkpoint cannot be loaded again for its Grad-CAM copy."""
