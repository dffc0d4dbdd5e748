"""A model whose ONNX export never ends, to see what becomes of the export's worker process when the process
that asked for the export dies (``tests/model/test_inference.py``).

    python -m tests.support.stuck_export MARKER

exports ``StuckModel(MARKER)``: the export's worker writes its pid to MARKER when tracing reaches the
forward pass, then waits there for ten minutes.
"""

from __future__ import annotations

import os
import sys
import threading
from pathlib import Path

import torch
from torch import nn

STUCK_FOR_S = 600.0


class StuckModel(nn.Module):
    def __init__(self, marker: str) -> None:
        super().__init__()
        self.marker = marker
        self.linear = nn.Linear(4, 2)

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        Path(self.marker).write_text(str(os.getpid()))
        threading.Event().wait(STUCK_FOR_S)
        return self.linear(batch.flatten(1)[:, :4])


if __name__ == "__main__":
    from model.inference import export_onnx

    export_onnx(StuckModel(sys.argv[1]))
