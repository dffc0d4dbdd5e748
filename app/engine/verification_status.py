"""What ``GET /model`` shows of the service's own verification of its CPU backends (``backend_verification``).

The verification itself is ``app/engine/self_verification.py``'s, which imports torch; its status stands apart
so that the API's bodies (``app/api/schemas.py``), which the control plane imports too, need no torch.
"""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, Field

Phase = Literal["waiting", "verifying", "verified", "kept_reference", "pinned", "not_applicable"]


class VerifiedBackend(BaseModel):
    backend: str
    accuracy: float = Field(description="top-1 on the report's image set, 0..1")
    agreement: float = Field(description="share of images whose top-1 class is eager float32's")
    max_probability_diff: float
    max_logit_diff: float | None = Field(description="largest |logit - float32's|: bounds the OOD score's change")
    images_per_s: dict[int, float] = Field(description="batch size -> images/s on this machine")
    within_drop: bool = Field(description="accuracy within APP_MAX_ACCURACY_DROP points of float32's")


class BackendVerificationStatus(BaseModel):
    """``GET /model``'s ``backend_verification``: where the choice of CPU backend stands on this machine."""

    phase: Phase
    summary: str = Field(description="one sentence: what is happening, or why the reference was kept")
    features: list[str] = Field(description="the CPU features the kernels may use here, after the ISA masks")
    isa_mask: dict[str, str] = Field(description="ATEN_CPU_CAPABILITY / ONEDNN_MAX_CPU_ISA as set, if set")
    source: Literal["checkpoint", "cache", "measured"] | None = Field(
        default=None, description="where the figures come from: the checkpoint's report (measured on a machine "
        "with this identity), this service's earlier measurement here, or the one it just made")
    image_set: str | None = Field(default=None, description="test or verification")
    images: int | None = None
    chosen: str | None = Field(default=None, description="the backend the figures choose")
    backends: list[VerifiedBackend] = Field(default_factory=list)
    skipped: dict[str, str] = Field(default_factory=dict)
    started_at: datetime | None = None
    seconds: float | None = Field(default=None, description="from the start of the measurement to its report")
