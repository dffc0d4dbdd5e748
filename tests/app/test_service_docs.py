"""docs/service.md is executable and in step with app/config.py: its curl commands run, as written, against
a live server, and its settings tables name every setting with its default."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from PIL import Image

from app.config import Settings
from tests.support import REPO_ROOT, images
from tests.support.docs import bash_blocks, page, table_rows
from tests.support.service import ADMIN_TOKEN, live_environment, live_server

PAGE = "docs/service.md"
# Inside the examples, make every curl fail on an HTTP error status, showing the body.
FAIL_ON_HTTP_ERRORS = 'curl() { command curl --fail-with-body "$@"; }\n'


def documented_default(value: object) -> str:
    """How the page writes a default: paths in the repository relative to it, booleans in lower case."""
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, Path):
        return f"`{value.relative_to(REPO_ROOT) if value.is_absolute() else value}`"
    if isinstance(value, float) and value.is_integer():
        return f"`{int(value)}`"
    return f"`{value}`"


def test_the_settings_tables_name_every_setting_with_its_default():
    rows = {cells[0].strip("`"): cells[1] for cells in table_rows(page(PAGE)) if cells[0].startswith("`APP_")}
    assert set(rows) == {f"APP_{name.upper()}" for name in Settings.model_fields}
    for name, field in Settings.model_fields.items():
        default = documented_default(field.get_default(call_default_factory=True))
        assert rows[f"APP_{name.upper()}"].startswith(default), f"APP_{name.upper()}: the default is {default}"


@pytest.mark.server
def test_the_curl_examples_run_against_a_live_server(tmp_path, tiny_checkpoint, other_checkpoint):
    assert shutil.which("curl"), "the page's examples use curl: install it (apt-get install -y curl)"
    blocks = [block for block in bash_blocks(page(PAGE)) if "curl " in block]
    assert len(blocks) >= 4
    workdir = tmp_path / "examples"
    workdir.mkdir()
    (workdir / "cat.png").write_bytes(images.png(seed=1))
    Image.fromarray(images.pixels(seed=2)).save(workdir / "dog.jpg")
    shutil.copytree(other_checkpoint, workdir / "other-checkpoint")
    # The page names the shipped model's v2 name; the test serves a tiny stand-in under that name.
    environment = live_environment(tiny_checkpoint, APP_RELOAD_ROOTS=json.dumps([str(workdir)]),
                                   APP_MODEL_NAME="fastcnn")
    with live_server(tmp_path, environment) as server:
        for block in blocks:
            script = FAIL_ON_HTTP_ERRORS + block.replace("http://localhost:8000", server.url)
            result = subprocess.run(["bash", "-e", "-c", script], cwd=workdir, capture_output=True, text=True,
                                    timeout=120, env=os.environ | {"APP_ADMIN_TOKEN": ADMIN_TOKEN})
            assert result.returncode == 0, f"{block}\nstdout: {result.stdout}\nstderr: {result.stderr}"
            assert '"detail"' not in result.stdout and '"error"' not in result.stdout, result.stdout
        # The harness itself would notice a failing example.
        failing = FAIL_ON_HTTP_ERRORS + f"curl -s {server.url}/no-such-route"
        assert subprocess.run(["bash", "-e", "-c", failing], capture_output=True).returncode != 0
