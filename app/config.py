"""The service's settings: one pydantic-settings class, read from ``APP_*`` environment variables.

Every field's default is documented here and in docs/service.md (a test compares the two); ``Settings()`` refuses
values that cannot work (a placeholder admin token, a queue too short for one batch upload) at start-up,
with a message saying what to set instead.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, ValidationError, ValidationInfo, field_validator, model_validator
from pydantic_core import ErrorDetails
from pydantic_settings import BaseSettings, SettingsConfigDict
from pydantic_settings import SettingsError as SourceError

from model.backend_report import DEFAULT_MAX_DROP_POINTS
from training.devices import DEVICE_NAMES, is_device_name

REPO_ROOT = Path(__file__).resolve().parents[1]
# The checkpoints that ship with the repository, one directory each; unless APP_WEIGHTS names another, the
# service serves the one whose card reports the highest test accuracy (app.control.plane.initial_model).
SHIPPED_WEIGHTS = REPO_ROOT / "weights"
# CIFAR-10 test images the web page offers to click (examples/README.md); served read-only by app/api/routes/web.py.
EXAMPLES_DIR = REPO_ROOT / "examples"

# Tokens that appear in templates and tutorials; a deployment that kept one has no secret at all.
PLACEHOLDER_TOKENS = frozenset({
    "changeme", "change-me", "change_me", "changethis", "change-this", "secret", "password", "admin",
    "token", "default", "example", "test", "xxx", "replaceme", "your-token", "your_token",
})
MIN_TOKEN_LENGTH = 16
# What APP_DATABASE_URL may start with: libpq's two spellings of a PostgreSQL URL.
POSTGRES_SCHEMES = ("postgresql://", "postgres://")


class Settings(BaseSettings):
    # hide_input_in_errors: a refused value (the admin token among them) must not be echoed into start-up logs.
    model_config = SettingsConfigDict(env_prefix="APP_", extra="ignore", frozen=True, hide_input_in_errors=True)

    weights: Path | None = Field(None, description="checkpoint directory (model.safetensors + card.json) served "
                                 "at start-up; unset = the shipped checkpoint under weights/ with the highest "
                                 "test accuracy. The registry's current version, when there is one, wins over "
                                 "both. When it does not exist the service starts without a model")
    reload_roots: list[Path] = Field(default_factory=list, description="folders (a JSON list) whose checkpoint "
                                     "directories POST /admin/reload may load, besides registry versions, the "
                                     "shipped weights and APP_WEIGHTS")
    shipped_weights: Path = Field(SHIPPED_WEIGHTS, description="the folder of shipped checkpoints (one "
                                  "directory each) that the default is chosen from when APP_WEIGHTS is unset")
    examples_dir: Path = Field(EXAMPLES_DIR, description="the CIFAR-10 test images the web page offers to click "
                               "(PNG files directly in it, served read-only); a missing folder offers none")
    device: str = Field("auto", description="auto (CUDA when available, else CPU), cpu, cuda or cuda:N")
    max_batch_size: int = Field(0, ge=0, le=4096, description="most images in one forward pass; 0 = automatic "
                                "(16 on the CPU, 128 on CUDA)")
    max_batch_delay_ms: float = Field(5.0, ge=0, le=1000, description="longest wait for more images after the "
                                      "first one of a batch arrives, while the device is idle")
    max_queue: int = Field(256, ge=1, description="images waiting for the device before new requests get 503")
    request_timeout_s: float = Field(30.0, gt=0, description="deadline of one request's inference; past it 504")
    max_upload_bytes: int = Field(16 * 1024 * 1024, ge=1, description="largest request body, in bytes")
    # 256 MiB: 16 uploads at APP_MAX_UPLOAD_BYTES at once, thousands of ordinary ones; held uploads then cost
    # at most this plus a constant, well inside the shipped 4 GiB pod beside the model (docs/service.md).
    max_upload_bytes_in_flight: int = Field(256 * 1024 * 1024, ge=1, description="request body bytes all the "
                                            "requests being read may hold together (their declared "
                                            "Content-Length, else what has arrived); past it 503 with "
                                            "Retry-After, before the body is read")
    max_decode_queue: int = Field(256, ge=1, description="images waiting for a decode thread; past it 503 with "
                                  "Retry-After")
    single_image_reserve: int | None = Field(None, ge=0, description="the last images of the queue that only "
                                             "single-image requests may take, so a flood of batch requests "
                                             "cannot answer everyone else with 503; unset = a quarter of "
                                             "APP_MAX_QUEUE, less if a full batch upload would not fit")
    max_client_images: int = Field(0, ge=0, description="images one client may have waiting for the device; "
                                   "past it 503, and 503 before the body until its Retry-After has passed; "
                                   "0 = no limit (behind a proxy every client has its address: set "
                                   "APP_CLIENT_ID_HEADER first)")
    client_id_header: str | None = Field(None, description="the request header naming the client for "
                                         "APP_MAX_CLIENT_IMAGES (one a proxy sets, such as X-Forwarded-For); "
                                         "unset = the peer address")
    swap_timeout_s: float = Field(600.0, gt=0, description="longest a model swap (load, verify, warm up, "
                                  "install) may take; past it the swap fails and the previous model keeps "
                                  "serving")
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
    cpu_backend: Literal["auto", "fused", "eager", "onnx", "bf16", "int8"] = Field(
        "auto", description="how the model runs on the CPU (model/inference.py). auto = the fastest backend "
        "whose test accuracy, verified for these weights on this kind of machine by the checkpoint's "
        "backends-cpu.json (python -m training.verify_backends), is within APP_MAX_ACCURACY_DROP of float32's; "
        "without a valid report, fused. fused = BatchNorm folded into the convolutions, exact; eager = as "
        "trained; onnx = ONNX Runtime, exact, needs the [onnx] extra; bf16 and int8 = faster, not exact (int8 "
        "calibrates on the checkpoint's calibration.safetensors, else on APP_DATA_DIR's training images)")
    cuda_precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="how the model runs on CUDA: auto = bf16 autocast when the checkpoint's "
        "backends-cuda.json verifies it within APP_MAX_ACCURACY_DROP of float32 and faster, else fp32; "
        "fp32; bf16 = autocast")
    max_accuracy_drop: float = Field(DEFAULT_MAX_DROP_POINTS, ge=0, le=100, description="auto's tolerance: most "
                                     "percentage points of test accuracy below float32 that a faster backend may lose")
    calibration: Literal["on", "off"] = Field("on", description="on: the served probabilities are "
                                               "temperature-scaled with the card's calibration, when it has one "
                                               "(model/trust.py); off: the raw softmax. The OOD flag is the same "
                                               "either way")
    explain_concurrency: int = Field(1, ge=1, le=64, description="Grad-CAM maps computed at once by POST "
                                     "/explain, on its own threads off the batching path; a request beyond "
                                     "them gets 503 at once")
    torch_threads: int = Field(0, ge=0, description="intra-op threads of each forward pass; 0 = automatic")
    parallel_batches: int = Field(0, ge=0, description="forward passes run at once; 0 = automatic")
    decode_threads: int = Field(0, ge=0, description="threads decoding images; 0 = automatic")
    log_level: str = Field("info", description="debug, info, warning or error")
    log_format: Literal["auto", "json", "text"] = Field("auto", description="json = one JSON object per line; "
                                                        "text = human-readable lines; auto = text on a "
                                                        "terminal, else json")
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
    # The KServe v2 gRPC server (app/grpc), in the same process and on the same engine as HTTP. 8081 is KServe's
    # own gRPC port (beside its 8080 for HTTP); Triton's 8001 is left to the control port.
    grpc_port: int = Field(8081, ge=0, le=65535, description="TCP port of the KServe v2 gRPC server "
                           "(inference.GRPCInferenceService and grpc.health.v1); 0 or empty = no gRPC server")
    grpc_host: str | None = Field(None, description="interface the gRPC server listens on; unset = the HTTP "
                                  "server's (python -m app's --host), else 127.0.0.1")
    # Training jobs and the model registry (docs/jobs.md).
    state_dir: Path = Field(Path("state"), description="the SQLite job database (jobs.db) and its runner lock "
                            "(runner.lock), and each training run's "
                            "directory (runs/<id>/)")
    registry_dir: Path | None = Field(None, description="the model registry; unset = $APP_STATE_DIR/registry")
    data_dir: Path = Field(Path("data"), description="the folder holding cifar-10-batches-py/ for training jobs")
    data_skip_integrity_check: bool = Field(False, description="pass --skip-integrity-check to training: for a "
                                            "copy of CIFAR-10 that is not byte-identical to torchvision's download "
                                            "(the same images re-pickled), which fails its MD5 check")
    promote: Literal["if-better", "always", "never"] = Field("if-better", description="what a successful "
                                                             "job does with its model (app/control/promotion.py)")
    training_device: str = Field("auto", description="--device of training jobs: auto, cpu, cuda or cuda:N")
    database_url: SecretStr | None = Field(None, description="the job database: unset = SQLite in "
                                           "$APP_STATE_DIR/jobs.db (one host); postgresql://user:password@host/db "
                                           "= PostgreSQL, shared by replicas anywhere (the [postgres] extra)")
    run_jobs: bool = Field(True, description="whether this replica may run training jobs: of all that may, the "
                           "job database elects one (a lock), and the others stand by")
    jobs_url: str | None = Field(None, description="where the replica that runs jobs is reached; named in "
                                 "the 503 that replicas with APP_RUN_JOBS=false answer POST /train with")
    control_port: int = Field(8001, ge=1, le=65535, description="the control plane's port (jobs API, "
                              "promotion); python -m app starts the control plane there, on 127.0.0.1, "
                              "unless APP_CONTROL_URL is set or APP_RUN_JOBS=false")
    control_url: str | None = Field(None, description="where this serving replica forwards POST /train, "
                                    "/train/* and POST /admin/promote/*; unset = start the control plane "
                                    "here as a supervised child process on APP_CONTROL_PORT")
    keep_runs: int = Field(50, ge=0, description="run directories kept (the newest jobs'; a queued or running "
                           "job's always); older ones are deleted, their job records stay; 0 = keep all")
    keep_versions: int = Field(20, ge=0, description="registry versions kept (the newest registered, plus the "
                               "current and previous ones always); 0 = keep all")
    registry_poll_s: float = Field(5.0, ge=0, description="how often to check the registry's current version "
                                   "and serve one another replica promoted; 0 = never")

    def __init__(self, **values: object) -> None:
        super().__init__(**values)  # type: ignore[arg-type]  # pydantic-settings types its own keywords only
        if not values:  # read from the environment alone, as the service starts (uvicorn app.main:app included)
            refuse_unknown_variables()

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

    @field_validator("database_url", mode="before")
    @classmethod
    def _postgres_url(cls, value: object) -> object:
        if value is None or value == "":
            return None
        url = value.get_secret_value() if isinstance(value, SecretStr) else str(value)
        if not url.startswith(POSTGRES_SCHEMES):
            raise ValueError("APP_DATABASE_URL must be a PostgreSQL URL such as "
                             "postgresql://user:password@host:5432/cifar_serve; unset it for the embedded SQLite store")
        return url

    @field_validator("grpc_port", mode="before")
    @classmethod
    def _empty_port_is_off(cls, value: object) -> object:
        return 0 if isinstance(value, str) and not value.strip() else value

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
        if token != token.strip():
            # A token read from a file or a secret store often ends in a newline; no client sends that, so
            # every admin request would be refused with 403 while the token looked set (issue 22).
            raise ValueError("APP_ADMIN_TOKEN has whitespace (a space or a newline) at its start or end, which no "
                             "request's Authorization header can carry, so it would never match; remove it "
                             "(e.g. printf '%s' \"$TOKEN\", or tr -d '\\n' when reading it from a file)")
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
    def _decode_queue_holds_one_upload(self) -> Settings:
        # The classifier hands a request's images to the decode threads together, so a full batch upload
        # needs that many places at once: with fewer it was answered 503 "retry in a moment" even when idle.
        if self.max_decode_queue < self.max_batch_files:
            raise ValueError(
                f"APP_MAX_DECODE_QUEUE={self.max_decode_queue} is smaller than APP_MAX_BATCH_FILES="
                f"{self.max_batch_files}, so a full batch upload could never be decoded; raise APP_MAX_DECODE_QUEUE "
                "or lower APP_MAX_BATCH_FILES"
            )
        return self

    @property
    def resolved_single_image_reserve(self) -> int:
        if self.single_image_reserve is not None:
            return self.single_image_reserve
        return min(self.max_queue // 4, self.max_queue - self.max_batch_files)

    @model_validator(mode="after")
    def _reserve_leaves_room_for_one_upload(self) -> Settings:
        if self.max_queue - self.resolved_single_image_reserve < self.max_batch_files:
            raise ValueError(
                f"APP_SINGLE_IMAGE_RESERVE={self.single_image_reserve} leaves less than APP_MAX_BATCH_FILES="
                f"{self.max_batch_files} of APP_MAX_QUEUE={self.max_queue} to batch uploads, so a full one could "
                "never be queued; lower APP_SINGLE_IMAGE_RESERVE or raise APP_MAX_QUEUE"
            )
        return self

    @model_validator(mode="after")
    def _budget_holds_one_upload(self) -> Settings:
        if self.max_upload_bytes_in_flight < self.max_upload_bytes:
            raise ValueError(
                f"APP_MAX_UPLOAD_BYTES_IN_FLIGHT={self.max_upload_bytes_in_flight} is smaller than "
                f"APP_MAX_UPLOAD_BYTES={self.max_upload_bytes}, so the largest upload could never be read; raise "
                "APP_MAX_UPLOAD_BYTES_IN_FLIGHT or lower APP_MAX_UPLOAD_BYTES"
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

class SettingsError(ValueError):
    """Settings that cannot work: one line per bad variable, naming it and what to set."""


def load_settings() -> Settings:
    """``Settings()`` from the environment, with pydantic's errors turned into one line per variable."""
    try:
        return Settings()
    except ValidationError as error:
        raise SettingsError("\n".join(_explain(detail) for detail in error.errors(include_url=False))) from None
    except SourceError as error:  # a list setting whose value is not JSON
        names = [f"APP_{name.upper()}" for name in Settings.model_fields if f'"{name}"' in str(error)]
        raise SettingsError(f"{' '.join(names) or 'a list setting'} must be a JSON list, such as "
                            '["/models"]') from None


def _explain(detail: ErrorDetails) -> str:
    location = detail["loc"]
    message = detail["msg"].removeprefix("Value error, ")
    if not location:
        return message  # a rule between settings: its message names them
    name = str(location[0])
    field = Settings.model_fields.get(name)
    variable = f"APP_{name.upper()}"
    if variable in message:  # the validator already wrote a whole sentence
        return message
    value = "" if name == "admin_token" else f"={detail.get('input')!r}"
    hint = f"; it is the {field.description}" if field is not None and field.description else ""
    default = "" if field is None else f" (unset: {field.get_default(call_default_factory=True)!r})"
    return f"{variable}{value}: {message}{hint}{default}"


def unknown_variables(environ: Mapping[str, str] = os.environ) -> list[str]:
    """A line for each ``APP_*`` variable that is no setting, with a guess at the one meant."""
    return [f"{variable} is not a setting and is ignored{guess}" for variable, guess in _unknown(environ)]


def refuse_unknown_variables(environ: Mapping[str, str] = os.environ) -> None:
    """Raise ``SettingsError`` naming every ``APP_*`` variable that is no setting. A misspelt setting would
    otherwise be silently ignored, and its default used instead: a wrong admin token name leaves the admin
    routes off, a wrong limit's name leaves the limit at its default. ``Settings()`` calls it whenever it reads
    the environment alone, so every way of starting the service refuses them, uvicorn's included."""
    unknown = _unknown(environ)
    if unknown:
        raise SettingsError("\n".join(f"{variable} is not a setting{guess}; correct or unset it (every APP_* "
                                      "variable is read as a setting)" for variable, guess in unknown))


def _unknown(environ: Mapping[str, str]) -> list[tuple[str, str]]:
    known = {f"APP_{name.upper()}" for name in Settings.model_fields}
    found = []
    for variable in sorted(environ):
        upper = variable.upper()
        if not upper.startswith("APP_") or upper in known:
            continue
        close = difflib.get_close_matches(upper, known, n=1, cutoff=0.6)
        found.append((variable, f"; did you mean {close[0]}?" if close else "; docs/service.md lists the settings"))
    return found
