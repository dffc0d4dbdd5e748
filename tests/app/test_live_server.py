"""The service as it runs in production: ``python -m app`` under uvicorn, driven over real sockets."""

from __future__ import annotations

import asyncio
import json
import re
import signal

import httpx
import numpy as np
import pytest

from app import __main__ as entry_point
from tests.support import images
from tests.support.service import ADMIN_TOKEN, live_environment, live_server
from tests.support.waiting import eventually, wait_until

AUTH = {"authorization": f"Bearer {ADMIN_TOKEN}"}


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_checkpoint, other_checkpoint):
    environment = live_environment(tiny_checkpoint, APP_RELOAD_ROOTS=json.dumps([str(other_checkpoint)]))
    with live_server(tmp_path_factory.mktemp("live"), environment) as running:
        yield running


def histogram(text: str, name: str) -> tuple[float, float]:
    """(observations of at most 1, all observations) of a Prometheus histogram."""
    ones = float(re.search(rf'^{name}_bucket{{le="1.0"}} (\S+)$', text, re.MULTILINE).group(1))
    count = float(re.search(rf"^{name}_count (\S+)$", text, re.MULTILINE).group(1))
    return ones, count


def probabilities(body: dict) -> np.ndarray:
    return np.array(list(body["probabilities"].values()))


def test_the_wrapper_defaults_to_localhost_port_8000(capsys):
    with pytest.raises(SystemExit):
        entry_point.main(["--help"])
    text = capsys.readouterr().out
    assert "127.0.0.1" in text and "8000" in text and "--workers" in text


@pytest.mark.server
def test_64_concurrent_requests_are_batched_and_answered_as_one_by_one(server):
    uploads = [images.png(32, 32, seed) for seed in range(64)]
    with httpx.Client(base_url=server.url, timeout=60) as client:
        alone = [client.post("/predict", content=d, headers={"content-type": "image/png"}).json() for d in uploads]
        before = histogram(client.get("/metrics").text, "inference_batch_images")

    async def burst() -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=64)
        async with httpx.AsyncClient(base_url=server.url, timeout=60, limits=limits) as client:
            return await asyncio.gather(*(client.post("/predict", content=d, headers={"content-type": "image/png"})
                                          for d in uploads))

    together = asyncio.run(burst())
    after = histogram(httpx.get(f"{server.url}/metrics").text, "inference_batch_images")
    assert all(response.status_code == 200 for response in together)
    singles, passes = after[0] - before[0], after[1] - before[1]
    assert passes < 64 and singles < passes, f"{passes} forward passes for 64 images: no batching happened"
    for single, response in zip(alone, together):
        assert response.json()["label"] == single["label"]
        assert np.allclose(probabilities(response.json()), probabilities(single), atol=1e-5)


@pytest.mark.server
def test_logs_are_json_lines_that_name_the_request(server):
    httpx.post(f"{server.url}/predict", content=images.TEXT,
               headers={"content-type": "image/png", "x-request-id": "live-log-check"})
    # The access line is written once the response has gone out, so it may land a moment after the answer.
    def logged() -> list[dict]:
        complete = server.log.read_text().rpartition("\n")[0].splitlines()
        lines = [json.loads(line) for line in complete if line.strip()]
        found = any(line.get("request_id") == "live-log-check" and line.get("status") == 415 for line in lines)
        return lines if found else []

    lines = wait_until(logged, what="an access-log line that names the request")
    assert all({"time", "level", "logger", "message"} <= set(line) for line in lines)


@pytest.mark.server
def test_a_hot_swap_under_sustained_load_fails_nothing_and_never_mixes_models(server, other_checkpoint,
                                                                              tiny_checkpoint):
    batch_files = [("files", (f"{n}.png", images.png(16, 16, n), "image/png")) for n in range(12)]

    async def scenario() -> tuple[list[list[str]], list[list[str]], list[int], str, str]:
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
            old = (await client.get("/model")).json()["version"]
            singles: list[list[str]] = [[] for _ in range(6)]
            batches: list[list[str]] = [[] for _ in range(2)]
            statuses: list[int] = []
            stop = asyncio.Event()

            async def single_client(seen: list[str]) -> None:
                while not stop.is_set():
                    response = await client.post("/predict", content=images.png(), headers={"content-type": "image/png"})
                    statuses.append(response.status_code)
                    seen.append(response.json()["model_version"])

            async def batch_client(seen: list[str]) -> None:
                while not stop.is_set():  # 12 images over 8-image passes: every answer spans two passes
                    response = await client.post("/predict/batch", files=batch_files)
                    statuses.append(response.status_code)
                    versions = {p["model_version"] for p in response.json()["predictions"]}
                    assert len(versions) == 1, f"one response mixed models: {versions}"
                    seen.append(versions.pop())

            tasks = [asyncio.create_task(single_client(seen)) for seen in singles]
            tasks += [asyncio.create_task(batch_client(seen)) for seen in batches]
            everyone = singles + batches
            await eventually(lambda: all(everyone), what="every client's answer before the swap")
            reload = await client.post("/admin/reload", headers=AUTH, json={"weights": str(other_checkpoint)})
            assert reload.status_code == 200, reload.text
            new = reload.json()["model_version"]
            await eventually(lambda: all(new in seen for seen in everyone), what="every client's answer after it")
            stop.set()
            await asyncio.gather(*tasks)
            await client.post("/admin/reload", headers=AUTH, json={"weights": str(tiny_checkpoint)})
            return singles, batches, statuses, old, new

    singles, batches, statuses, old, new = asyncio.run(scenario())
    assert statuses and set(statuses) == {200}, f"failed requests during the swap: {set(statuses)}"
    for seen in singles + batches:
        assert old in seen and new in seen, "every client should see both models"
        switch = seen.index(new)
        assert set(seen[:switch]) == {old} and set(seen[switch:]) == {new}, "a client went back to the old model"


@pytest.mark.server
def test_a_burst_past_a_tiny_queue_gets_503_with_retry_after_and_nothing_else_breaks(tmp_path, tiny_checkpoint):
    environment = live_environment(tiny_checkpoint, APP_MAX_QUEUE="4", APP_MAX_BATCH_FILES="4",
                                   APP_MAX_BATCH_SIZE="2")
    with live_server(tmp_path, environment) as tiny:
        async def burst() -> list[httpx.Response]:
            async with httpx.AsyncClient(base_url=tiny.url, timeout=60,
                                         limits=httpx.Limits(max_connections=48)) as client:
                return await asyncio.gather(*(client.post("/predict", content=images.png(seed=n),
                                                          headers={"content-type": "image/png"}) for n in range(48)))

        responses = asyncio.run(burst())
        statuses = [response.status_code for response in responses]
        assert set(statuses) == {200, 503}, statuses
        for response in responses:
            if response.status_code == 503:
                assert int(response.headers["retry-after"]) >= 1
                assert "APP_MAX_QUEUE=4" in response.json()["detail"]
        assert httpx.get(f"{tiny.url}/readyz").status_code == 200
        after = httpx.post(f"{tiny.url}/predict", content=images.png(), headers={"content-type": "image/png"})
        assert after.status_code == 200
        metrics = httpx.get(f"{tiny.url}/metrics").text
        assert f'inference_dropped_images_total{{reason="queue_full"}} {float(statuses.count(503))}' in metrics


@pytest.mark.server
def test_sigterm_finishes_the_requests_in_flight(tmp_path, tiny_checkpoint):
    environment = live_environment(tiny_checkpoint, APP_MAX_BATCH_SIZE="1", APP_MAX_BATCH_FILES="32")
    files = [("files", (f"{n}.png", images.png(32, 32, n), "image/png")) for n in range(32)]
    with live_server(tmp_path, environment) as stopping:
        async def in_flight() -> list[httpx.Response]:
            async with httpx.AsyncClient(base_url=stopping.url, timeout=60) as client:
                requests = [asyncio.create_task(client.post("/predict/batch", files=files)) for _ in range(6)]

                async def queued() -> bool:  # 192 one-image passes: seconds of work once queued
                    metrics = (await client.get("/metrics")).text
                    return float(re.search(r"^inference_queue_images (\S+)$", metrics, re.MULTILINE).group(1)) > 0

                await eventually(queued, what="images of the requests in flight to queue", every_s=0.05)
                stopping.process.send_signal(signal.SIGTERM)
                return await asyncio.gather(*requests)

        responses = asyncio.run(in_flight())
        assert [response.status_code for response in responses] == [200] * 6
        assert all(len(response.json()["predictions"]) == 32 for response in responses)
        # uvicorn re-raises the signal once its graceful shutdown is done, so the exit reads as SIGTERM.
        assert stopping.process.wait(timeout=30) in (0, -signal.SIGTERM)
        assert not [line for line in stopping.log_lines() if '"level": "error"' in line]
        with pytest.raises(httpx.TransportError):
            httpx.get(f"{stopping.url}/healthz")


@pytest.mark.server
def test_uvicorn_app_main_app_starts_the_same_service(tmp_path, tiny_checkpoint):
    command = ("-m", "uvicorn", "app.main:app")
    with live_server(tmp_path, live_environment(tiny_checkpoint), command=command) as server:
        response = httpx.post(f"{server.url}/predict", files={"file": ("a.png", images.png())})
        assert response.status_code == 200 and response.json()["model_version"].startswith("resnet18-")
