"""The README's "Service" section is executable: its curl commands run, as written, against a live server."""

from __future__ import annotations

import os
import re
import shutil
import subprocess

import pytest
from PIL import Image

from tests.support import REPO_ROOT, images
from tests.support.service import ADMIN_TOKEN, live_environment, live_server

# Inside the examples, make every curl fail on an HTTP error status, showing the body.
FAIL_ON_HTTP_ERRORS = 'curl() { command curl --fail-with-body "$@"; }\n'


def service_section() -> str:
    text = (REPO_ROOT / "README.md").read_text()
    start = text.index("\n## Service\n")
    end = text.find("\n## ", start + 1)
    return text[start: end if end != -1 else len(text)]


def curl_blocks() -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", service_section(), re.DOTALL)
    return [block for block in blocks if "curl " in block]


def test_the_section_documents_every_service_setting():
    from app.config import Settings

    section = service_section()
    serving = ["weights", "shipped_weights", "device", "max_batch_size", "max_batch_delay_ms", "max_queue", "request_timeout_s",
               "max_upload_bytes", "max_image_pixels", "max_batch_files", "admin_token", "cpu_backend",
               "torch_threads", "parallel_batches", "decode_threads", "log_level"]
    assert set(serving) <= set(Settings.model_fields)
    for name in serving:
        assert f"`APP_{name.upper()}`" in section, f"APP_{name.upper()} is not in the README's Service section"


@pytest.mark.server
def test_the_curl_examples_run_against_a_live_server(tmp_path, tiny_checkpoint, other_checkpoint):
    assert shutil.which("curl"), "the README's examples use curl: install it (apt-get install -y curl)"
    blocks = curl_blocks()
    assert len(blocks) >= 4
    workdir = tmp_path / "examples"
    workdir.mkdir()
    (workdir / "cat.png").write_bytes(images.png(seed=1))
    Image.fromarray(images.pixels(seed=2)).save(workdir / "dog.jpg")
    shutil.copytree(other_checkpoint, workdir / "other-checkpoint")
    with live_server(tmp_path, live_environment(tiny_checkpoint)) as server:
        for block in blocks:
            script = FAIL_ON_HTTP_ERRORS + block.replace("http://localhost:8000", server.url)
            result = subprocess.run(["bash", "-e", "-c", script], cwd=workdir, capture_output=True, text=True,
                                    timeout=120, env=os.environ | {"APP_ADMIN_TOKEN": ADMIN_TOKEN})
            assert result.returncode == 0, f"{block}\nstdout: {result.stdout}\nstderr: {result.stderr}"
            assert '"detail"' not in result.stdout and '"error"' not in result.stdout, result.stdout
        # The harness itself would notice a failing example.
        failing = FAIL_ON_HTTP_ERRORS + f"curl -s {server.url}/no-such-route"
        assert subprocess.run(["bash", "-e", "-c", failing], capture_output=True).returncode != 0
