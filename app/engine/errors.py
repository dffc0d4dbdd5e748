"""What can go wrong between an upload and a prediction; each message says what happened and what to do.

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


class SwapRefused(ServingError):
    """A checkpoint that loads but cannot replace the serving model (for example, another input size)."""
