"""The registry follower of a serving replica: a pointer that cannot be read is retried and reported, never a
reason to stop serving (issue 22). Against a live ``python -m app``: real files, a real process, real sockets."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import httpx
import pytest
from prometheus_client import CollectorRegistry

from app.control.follower import MAX_BACKOFF_S, RegistryFollower, RegistryMetrics, error_name
from app.control.registry import ModelRegistry
from tests.support import images
from tests.support.checkpoints import make_checkpoint
from tests.support.service import ADMIN, live_environment, live_server
from tests.support.waiting import wait_until


def _predicts(http: httpx.Client, url: str) -> str:
    response = http.post(f"{url}/predict", files={"file": ("a.png", images.png(), "image/png")})
    assert response.status_code == 200, response.text
    return response.json()["model_version"]


def _read_errors(http: httpx.Client, url: str, error: str) -> float:
    text = http.get(f"{url}/metrics").text
    found = re.search(rf'^registry_read_errors_total{{error="{error}"}} (\S+)$', text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


@pytest.mark.server
def test_an_unreadable_pointer_keeps_the_replica_serving_reports_it_and_recovers(
        tmp_path: Path, tiny_checkpoint: Path) -> None:
    registry = ModelRegistry(tmp_path / "registry")
    version = registry.register(make_checkpoint(tmp_path / "promoted", seed=7)).version
    pointer = registry.root / "current"
    env = live_environment(tiny_checkpoint, APP_REGISTRY_DIR=str(registry.root), APP_REGISTRY_POLL_S="0.05",
                           APP_RUN_JOBS="false")
    with live_server(tmp_path, env) as server, httpx.Client(timeout=30) as http:
        serving = _predicts(http, server.url)
        assert http.get(f"{server.url}/readyz").json()["registry_error"] is None
        assert "registry_readable 1.0" in http.get(f"{server.url}/metrics").text

        # A directory where the pointer file was: every read fails with EISDIR, a real OSError.
        pointer.mkdir()
        fault = wait_until(lambda: http.get(f"{server.url}/readyz").json()["registry_error"], what="the fault")
        assert "EISDIR" in fault and serving in fault and "retrying" in fault
        assert str(registry.root) not in fault, "an anonymous caller was shown the registry's full path"
        assert str(registry.root) in http.get(f"{server.url}/readyz", headers=ADMIN).json()["registry_error"]
        assert _predicts(http, server.url) == serving
        assert server.process.poll() is None
        wait_until(lambda: _read_errors(http, server.url, "EISDIR") >= 2, what="the reads to be retried")
        assert "registry_readable 0.0" in http.get(f"{server.url}/metrics").text

        # Bytes that are not UTF-8: the same, under its own label (the registry calls it a malformed pointer).
        pointer.rmdir()
        pointer.write_bytes(b"\xff\xfe\n")
        wait_until(lambda: _read_errors(http, server.url, "RegistryError") >= 1, what="the decoding error")
        assert _predicts(http, server.url) == serving

        # Fixed, and naming another version: the replica recovers and serves it.
        pointer.unlink()
        registry.set_current(version)
        wait_until(lambda: http.get(f"{server.url}/readyz").json()["registry_error"] is None, what="recovery")
        wait_until(lambda: _predicts(http, server.url) == version, what="the pointer's version to be served")
        assert "registry_readable 1.0" in http.get(f"{server.url}/metrics").text
        assert any("readable again" in line for line in server.log_lines())
        assert not any("stopping the service" in line for line in server.log_lines())


class _Engine:
    card = None

    async def swap(self, checkpoint: Path, origin: str = "") -> None:
        raise AssertionError("nothing to swap in")


def test_failed_reads_back_off_exponentially_up_to_a_bound(tmp_path: Path) -> None:
    from prometheus_client import CollectorRegistry

    follower = RegistryFollower(tmp_path, _Engine(), 0.5, RegistryMetrics(CollectorRegistry()))  # type: ignore[arg-type]
    delays = []
    for failures in range(10):
        follower.failures = failures
        delays.append(follower.next_delay_s())
    assert delays[:4] == [0.5, 1.0, 2.0, 4.0] and delays[-1] == MAX_BACKOFF_S
    assert delays == sorted(delays)


def test_errors_are_named_by_their_errno(tmp_path: Path) -> None:
    with pytest.raises(OSError) as raised:
        (tmp_path / "absent").read_text()
    assert error_name(raised.value) == "ENOENT"
    assert error_name(UnicodeDecodeError("utf-8", b"\xff", 0, 1, "bad")) == "UnicodeDecodeError"


class _Serving:
    """The engine as the follower sees it: the card of what it serves."""

    def __init__(self, version: str) -> None:
        self.card = type("Card", (), {"version": version})()

    async def swap(self, checkpoint: Path, origin: str = "") -> None:
        raise AssertionError("nothing to swap in")


def test_a_replica_records_what_it_serves_so_retention_spares_it(tmp_path: Path) -> None:
    registry = ModelRegistry(tmp_path / "registry")
    served = registry.register(make_checkpoint(tmp_path / "served", seed=3)).version
    follower = RegistryFollower(registry.root, _Serving(served), 0, RegistryMetrics(CollectorRegistry()))
    asyncio.run(follower.check())
    assert registry.serving_versions() == {served}
    # Not current, not previous: only the replica's record keeps it from being pruned.
    for seed in (4, 5, 6):
        registry.set_current(registry.register(make_checkpoint(tmp_path / f"newer-{seed}", seed=seed)).version)
    registry.prune(keep=1)
    assert registry.path(served).is_dir()
