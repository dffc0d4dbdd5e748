"""RUN/state.pt: everything --resume needs to continue a run as if it had never stopped.

It holds the model, optimizer (momentum buffers), scheduler and EMA state, the number of finished epochs, the
training seconds spent so far, the length of metrics.jsonl at that point, and the global RNG states. The
per-epoch shuffle and augmentation generators need no saving: training/sampling.py derives them from the
seed and the epoch number. Written atomically and durably (a temporary file, fsynced, then renamed:
``model.durable``), so a kill or power cut mid-write leaves the previous state.pt intact; read with
``weights_only=True``, so loading it never runs pickled code.
"""

from __future__ import annotations

import pickle
import random
from pathlib import Path
from typing import Any

import torch

from model.durable import replace_durably


class StateError(RuntimeError):
    """state.pt is missing or unreadable; the message says what to do."""


def rng_states() -> dict[str, Any]:
    """Global generators: nothing in training draws from them today (the model has no dropout, sampling uses
    its own generators), but anything added later that does would otherwise break exact resumption."""
    states: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: dict[str, Any]) -> None:
    # Generator states must be CPU byte tensors, whatever map_location put them on.
    torch.set_rng_state(states["torch"].cpu())
    random.setstate(states["python"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([state.cpu() for state in states["cuda"]])


def save_state(path: Path, state: dict[str, Any]) -> None:
    temporary = path.with_suffix(".tmp")
    try:
        torch.save(state, temporary)
        replace_durably(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def load_state(path: Path, device: torch.device) -> dict[str, Any]:
    if not path.is_file():
        raise StateError(f"{path} does not exist: the run never got going; start it again without --resume "
                         "(in a new --run-dir, or after deleting this one)")
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as error:
        raise StateError(f"{path} is unreadable ({type(error).__name__}: {error}); start the run afresh") from None
