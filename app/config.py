"""The service's settings: one pydantic-settings class, read from ``APP_*`` environment variables.

Every field's default is documented here and in docs/service.md (a test compares the two); ``Settings()`` refuses
values that cannot work (a placeholder admin token, a queue too short for one batch upload) at start-up,
with a message saying what to set instead.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, ValidationInfo, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from training.devices import DEVICE_NAMES, is_device_name

REPO_ROOT = Path(__file__).resolve().parents[1]
# The checkpoints that ship with the repository, one directory each; unless APP_WEIGHTS names another, the
# service serves the one whose card reports the highest test accuracy (app.control.plane.initial_model).
SHIPPED_WEIGHTS = REPO_ROOT / "weights"

# Tokens that appear in templates and tutorials; a deployment that kept one has no secret at all.
PLACEHOLDER_TOKENS = frozenset({
    "changeme", "change-me", "change_me", "changethis", "change-this", "secret", "password", "admin",
    "token", "default", "example", "test", "xxx", "replaceme", "your-token", "your_token",
})
MIN_TOKEN_LENGTH = 16


class Settings(BaseSettings):
    # hide_input_in_errors: a refused value (the admin token among them) must not be echoed into start-up logs.
    model_config = SettingsConfigDict(env_prefix="APP_", extra="ignore", frozen=True, hide_input_in_errors=True)

    weights: Path | None = Field(None, description="checkpoint directory (model.safetensors + card.json) served "
                                 "at start-up; unset = the shipped checkpoint under weights/ with the highest "
                                 "test accuracy. The registry's current version, when there is one, wins over "
                                 "both. When it does not exist the service starts without a model")
    shipped_weights: Path = Field(SHIPPED_WEIGHTS, description="the folder of shipped checkpoints (one "
                                  "directory each) that the default is chosen from when APP_WEIGHTS is unset")
    device: str = Field("auto", description="auto (CUDA when available, else CPU), cpu, cuda or cuda:N")
    max_batch_size: int = Field(0, ge=0, le=4096, description="most images in one forward pass; 0 = automatic "
                                "(16 on the CPU, 128 on CUDA)")
    max_batch_delay_ms: float = Field(5.0, ge=0, le=1000, description="longest wait for more images after the "
                                      "first one of a batch arrives, while the device is idle")
    max_queue: int = Field(256, ge=1, description="images waiting for the device before new requests get 503")
    request_timeout_s: float = Field(30.0, gt=0, description="deadline of one request's inference; past it 504")
    max_upload_bytes: int = Field(16 * 1024 * 1024, ge=1, description="largest request body, in bytes")
    max_json_bytes: int = Field(64 * 1024, ge=1, description="largest JSON body of the admin and training "
                                "routes, in bytes; checked after the token, while it streams in")
    # The model sees 32x32 pixels: 2048x2048 is far more than it needs, and an RGBA PNG or a float TIFF of that
    # size already costs ~64 MiB to decode (40 MP cost ~1 GiB and 1.4 CPU-s, from ~200 KiB uploaded).
    max_image_pixels: int = Field(2048 * 2048, ge=1, description="largest image (width x height), from its "
                                  "header before decoding")
    max_request_pixels: int = Field(4 * 2048 * 2048, ge=1, description="most pixels of all the images of one "
                                    "request together (a /predict/batch), from their headers before decoding")
    max_batch_files: int = Field(64, ge=1, description="most images in one /predict/batch or v2 infer request")
    model_name: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$", description="the "
                                   "model's name in the KServe v2 API (/v2/models/<name>); unset = the served "
                                   "architecture")
    admin_token: SecretStr | None = Field(None, description="Bearer token for /admin/*; unset disables them")
    cpu_backend: Literal["fused", "eager", "onnx", "bf16", "int8"] = Field(
        "fused", description="how the model runs on the CPU (model/inference.py): fused = BatchNorm folded into "
        "the convolutions, exact and faster; eager = as trained; onnx = ONNX Runtime, exact, needs the [onnx] "
        "extra; bf16 and int8 = much faster but not exact, opt-in until a trained model's accuracy with them "
        "is checked (int8 calibrates on APP_DATA_DIR)")
    torch_threads: int = Field(0, ge=0, description="intra-op threads of each forward pass; 0 = automatic")
    parallel_batches: int = Field(0, ge=0, description="forward passes run at once; 0 = automatic")
    decode_threads: int = Field(0, ge=0, description="threads decoding images; 0 = automatic")
    log_level: str = Field("info", description="debug, info, warning or error")
    # The HTTP server (python -m app; app/server.py): what one connection may cost before it is answered.
    max_header_bytes: int = Field(32 * 1024, ge=1024, description="largest request head (request line and "
                                  "headers), in bytes; past it 431 and the connection is closed")
    header_timeout_s: float = Field(10.0, gt=0, description="deadline for a request's head, from its first byte "
                                    "(or from the connection's start); past it the connection is closed")
    body_timeout_s: float = Field(60.0, gt=0, description="deadline for a request's body, from the end of its "
                                  "head; past it the connection is closed")
    keep_alive_timeout_s: float = Field(5.0, gt=0, description="how long an idle keep-alive connection stays "
                                        "open")
    max_connections: int = Field(1024, ge=1, description="open connections (and requests in progress) of one "
                                 "worker; past it new requests get 503")
    # Training jobs and the model registry (docs/jobs.md).
    state_dir: Path = Field(Path("state"), description="the job database (jobs.db) and each training run's "
                            "directory (runs/<id>/)")
    registry_dir: Path | None = Field(None, description="the model registry; unset = $APP_STATE_DIR/registry")
    data_dir: Path = Field(Path("data"), description="the folder holding cifar-10-batches-py/ for training jobs")
    data_skip_integrity_check: bool = Field(False, description="pass --skip-integrity-check to training: "
                                            "needed for rebuilt copies such as ../shared/cifar10")
    promote: Literal["if-better", "always", "never"] = Field("if-better", description="what a successful "
                                                             "job does with its model (app/control/promotion.py)")
    training_device: str = Field("auto", description="--device of training jobs: auto, cpu, cuda or cuda:N")
    run_jobs: bool = Field(True, description="whether this replica runs training jobs; exactly one should")
    jobs_url: str | None = Field(None, description="where the replica that runs jobs is reached; named in "
                                 "the 503 that replicas with APP_RUN_JOBS=false answer POST /train with")
    registry_poll_s: float = Field(5.0, ge=0, description="how often to check the registry's current version "
                                   "and serve one another replica promoted; 0 = never")

    @field_validator("device", "training_device")
    @classmethod
    def _known_device(cls, value: str, info: ValidationInfo) -> str:
        if not is_device_name(value):
            setting = f"APP_{(info.field_name or '').upper()}"
            raise ValueError(f"{setting}={value!r} is not a device: use {DEVICE_NAMES}")
        return value

    @property
    def registry_path(self) -> Path:
        return self.registry_dir if self.registry_dir is not None else self.state_dir / "registry"

    @field_validator("log_level")
    @classmethod
    def _known_level(cls, value: str) -> str:
        if value.lower() not in {"debug", "info", "warning", "error"}:
            raise ValueError(f"APP_LOG_LEVEL={value!r}: use debug, info, warning or error")
        return value.lower()

    @field_validator("admin_token", mode="before")
    @classmethod
    def _real_secret(cls, value: object) -> object:
        if value is None or value == "":
            return None
        token = value.get_secret_value() if isinstance(value, SecretStr) else str(value)
        # Counted without surrounding whitespace: 16 spaces are no secret.
        if token.strip().lower() in PLACEHOLDER_TOKENS or len(token.strip()) < MIN_TOKEN_LENGTH:
            raise ValueError(
                f"APP_ADMIN_TOKEN must be a real secret of at least {MIN_TOKEN_LENGTH} characters, not a "
                "placeholder; make one with: python -c 'import secrets; print(secrets.token_urlsafe(32))'"
            )
        return token

    @model_validator(mode="after")
    def _queue_holds_one_upload(self) -> Settings:
        if self.max_queue < self.max_batch_files:
            raise ValueError(
                f"APP_MAX_QUEUE={self.max_queue} is smaller than APP_MAX_BATCH_FILES={self.max_batch_files}, so a "
                "full batch upload could never be queued; raise APP_MAX_QUEUE or lower APP_MAX_BATCH_FILES"
            )
        return self

    @model_validator(mode="after")
    def _request_budget_holds_one_image(self) -> Settings:
        if self.max_request_pixels < self.max_image_pixels:
            raise ValueError(
                f"APP_MAX_REQUEST_PIXELS={self.max_request_pixels} is smaller than APP_MAX_IMAGE_PIXELS="
                f"{self.max_image_pixels}, so one image at the limit could never be classified; raise "
                "APP_MAX_REQUEST_PIXELS or lower APP_MAX_IMAGE_PIXELS"
            )
        return self
