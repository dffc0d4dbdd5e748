"""The inference engine: the served model on its device, and the dynamic-batching loop (see engine.py)."""
