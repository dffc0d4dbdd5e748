"""The inference engine: preprocessing, the served model and the dynamic-batching loop (see engine.py)."""
