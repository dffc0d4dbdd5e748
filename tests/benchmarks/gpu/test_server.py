import time

import pytest

from benchmarks.gpu.server import ServiceFailed, service
from tests.support.checkpoints import make_checkpoint

pytestmark = pytest.mark.server


def test_a_service_that_exits_is_reported_at_once_with_its_log(tmp_path):
    started = time.monotonic()
    with pytest.raises(ServiceFailed, match="exited with") as failure:
        with service(None, {"APP_MAX_BATCH_SIZE": "not-a-number", "APP_STATE_DIR": str(tmp_path / "state")},
                     ready_timeout_s=600, log_dir=tmp_path):
            pass
    assert time.monotonic() - started < 120
    assert "APP_MAX_BATCH_SIZE" in str(failure.value).upper() or "max_batch_size" in str(failure.value)


def test_a_checkpoint_that_cannot_load_ends_the_wait_before_its_timeout(tmp_path):
    checkpoint = make_checkpoint(tmp_path / "broken")
    (checkpoint / "model.safetensors").write_bytes(b"not safetensors")
    started = time.monotonic()
    with pytest.raises(ServiceFailed, match="could not load its model"):
        with service(checkpoint, {"APP_STATE_DIR": str(tmp_path / "state"), "APP_DEVICE": "cpu"},
                     ready_timeout_s=600, log_dir=tmp_path):
            pass
    assert time.monotonic() - started < 120
