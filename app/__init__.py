"""How the model is served: a FastAPI service around a dynamic-batching inference engine."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("cifar-serve")
except PackageNotFoundError:  # running from a checkout that was never pip-installed
    __version__ = "0+unknown"
