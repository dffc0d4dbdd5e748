"""Kept so that branches written against it still import: the helper is ``tests.support.net.free_port``."""

from tests.support.net import free_port

__all__ = ["free_port"]
