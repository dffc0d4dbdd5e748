import os
import subprocess
import sys

import pytest
from pydantic import ValidationError

from app.config import Settings, SettingsError, load_settings
from tests.support import REPO_ROOT


def test_defaults(monkeypatch):
    for name in list(__import__("os").environ):
        if name.startswith("APP_"):
            monkeypatch.delenv(name)
    settings = Settings()
    assert settings.weights is None, "unset: the best shipped checkpoint (app.control.plane.initial_model)"
    assert settings.device == "auto" and settings.admin_token is None
    assert (settings.max_batch_size, settings.max_queue, settings.max_batch_files) == (0, 256, 64)
    # The model sees 32x32 pixels: about 4 MP per image is plenty, and a batch may not add up to 64 of them.
    assert settings.max_image_pixels <= 4_200_000
    assert settings.max_request_pixels < settings.max_batch_files * settings.max_image_pixels


def test_settings_come_from_app_environment_variables(monkeypatch, tmp_path):
    monkeypatch.setenv("APP_WEIGHTS", str(tmp_path))
    monkeypatch.setenv("APP_DEVICE", "cuda:1")
    monkeypatch.setenv("APP_MAX_BATCH_SIZE", "7")
    monkeypatch.setenv("APP_MAX_BATCH_DELAY_MS", "2.5")
    monkeypatch.setenv("APP_ADMIN_TOKEN", "a-long-enough-real-secret")
    settings = Settings()
    assert settings.weights == tmp_path and settings.device == "cuda:1"
    assert settings.max_batch_size == 7 and settings.max_batch_delay_ms == 2.5
    assert settings.admin_token.get_secret_value() == "a-long-enough-real-secret"
    assert "a-long-enough" not in repr(settings), "the token must not show in logs or tracebacks"


@pytest.mark.parametrize("token", ["changeme", "CHANGEME", "changethis", "secret", "password", "short-token"])
def test_placeholder_and_short_admin_tokens_are_refused(token):
    with pytest.raises(ValidationError, match="APP_ADMIN_TOKEN must be a real secret"):
        Settings(admin_token=token)


def test_an_empty_admin_token_means_admin_is_disabled():
    assert Settings(admin_token="").admin_token is None


@pytest.mark.parametrize("device", ["gpu", "cuda:", "CPU", "mps", "cuda:x"])
def test_unknown_devices_are_refused(device):
    with pytest.raises(ValidationError, match="use auto, cpu, cuda or cuda:N"):
        Settings(device=device)


@pytest.mark.parametrize(("field", "value"), [("max_batch_size", -1), ("max_queue", 0), ("request_timeout_s", 0),
                                              ("max_upload_bytes", 0), ("max_batch_delay_ms", -1)])
def test_limits_must_be_positive(field, value):
    with pytest.raises(ValidationError, match=field):
        Settings(**{field: value})


def test_a_queue_shorter_than_one_batch_upload_is_refused():
    with pytest.raises(ValidationError, match="APP_MAX_QUEUE=8 is smaller than APP_MAX_BATCH_FILES=16"):
        Settings(max_queue=8, max_batch_files=16)


def test_a_decode_queue_shorter_than_one_batch_upload_is_refused():
    """A full /predict/batch upload needs that many places in the decode queue at once; with fewer it would be
    answered 503 "retry in a moment" on an idle service, every time."""
    with pytest.raises(ValidationError, match="APP_MAX_DECODE_QUEUE=8 is smaller than APP_MAX_BATCH_FILES=16"):
        Settings(max_decode_queue=8, max_batch_files=16)
    assert Settings(max_decode_queue=16, max_batch_files=16).max_decode_queue == 16


def test_the_database_url_is_postgresql_or_unset():
    assert Settings(database_url="").database_url is None
    url = "postgresql://app:hunter2-secret@db:5432/jobs"
    settings = Settings(database_url=url)
    assert settings.database_url.get_secret_value() == url and "hunter2" not in repr(settings)
    with pytest.raises(ValidationError, match="APP_DATABASE_URL must be a PostgreSQL URL"):
        Settings(database_url="mysql://db/jobs")


@pytest.mark.parametrize("token", [" " * 16, "\t" * 20, " " * 8 + "short" + " " * 8])
def test_a_token_of_whitespace_is_refused(token):
    with pytest.raises(ValidationError, match="APP_ADMIN_TOKEN must be a real secret"):
        Settings(admin_token=token)


def test_a_refused_token_is_not_echoed_in_the_error():
    with pytest.raises(ValidationError) as refused:
        Settings(admin_token="hunter2-xyz")
    assert "hunter2-xyz" not in str(refused.value)


def test_a_request_pixel_budget_below_one_image_is_refused():
    with pytest.raises(ValidationError, match="APP_MAX_REQUEST_PIXELS=100 is smaller than APP_MAX_IMAGE_PIXELS"):
        Settings(max_request_pixels=100, max_image_pixels=1000)


@pytest.mark.parametrize("name", ["", "a/b", "../x", "-lead", "x" * 65])
def test_model_names_that_do_not_fit_in_a_url_path_are_refused(name):
    with pytest.raises(ValidationError, match="model_name"):
        Settings(model_name=name)


@pytest.mark.parametrize("token", ["a-long-enough-real-secret\n", " a-long-enough-real-secret",
                                   "a-long-enough-real-secret\t"])
def test_an_admin_token_with_surrounding_whitespace_is_refused(monkeypatch, token):
    monkeypatch.setenv("APP_ADMIN_TOKEN", token)
    with pytest.raises(SettingsError) as error:
        load_settings()
    assert "APP_ADMIN_TOKEN has whitespace" in str(error.value) and "never match" in str(error.value)
    assert "real-secret" not in str(error.value)


def test_a_misspelt_setting_is_refused_when_settings_come_from_the_environment(monkeypatch):
    monkeypatch.setenv("APP_MAX_BACH_SIZE", "8")
    with pytest.raises(SettingsError, match="APP_MAX_BACH_SIZE is not a setting; did you mean APP_MAX_BATCH_SIZE"):
        Settings()
    with pytest.raises(SettingsError, match="APP_MAX_BACH_SIZE"):
        load_settings()
    assert Settings(device="cpu").device == "cpu"  # explicit settings (tests, embedding) read no stray variables


def test_uvicorn_refuses_a_misspelt_setting_too(tmp_path):
    """The path that skipped the check before: `uvicorn app.main:app`, not `python -m app`."""
    env = {name: value for name, value in os.environ.items() if not name.startswith("APP_")}
    env |= {"APP_ADMIN_TOKNE": "a-long-enough-real-secret", "APP_STATE_DIR": str(tmp_path)}
    started = subprocess.run([sys.executable, "-m", "uvicorn", "app.main:app", "--port", "0"], cwd=REPO_ROOT,
                             env=env, capture_output=True, text=True, timeout=300)
    assert started.returncode != 0
    assert "APP_ADMIN_TOKNE is not a setting; did you mean APP_ADMIN_TOKEN?" in started.stderr
