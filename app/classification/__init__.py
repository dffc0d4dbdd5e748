"""The classification pipeline: from an upload's bytes to its answer, in named stages (see classifier.py)."""
