"""The gRPC server's life in ``python -m app`` (``app/grpc/server.py``): load shedding as UNAVAILABLE with a
retry-after, calls in flight finished on SIGTERM, a taken port refused at start-up. The calls go through
tritonclient's own generated stubs."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import subprocess
import sys

import grpc
import httpx
import numpy as np
import pytest
from tritonclient.grpc import service_pb2 as triton
from tritonclient.grpc import service_pb2_grpc as triton_grpc

from tests.support import REPO_ROOT, images
from tests.support.net import free_port
from tests.support.service import live_environment, live_server
from tests.support.waiting import eventually

pytestmark = pytest.mark.server
NAME = "resnet18"
Answer = triton.ModelInferResponse | grpc.aio.AioRpcError


def infer_request(count: int) -> triton.ModelInferRequest:
    pixels = np.stack([images.pixels(32, 32, seed) for seed in range(count)])
    request = triton.ModelInferRequest(model_name=NAME)
    request.inputs.add(name="pixels", datatype="UINT8", shape=list(pixels.shape))
    request.raw_input_contents.append(pixels.tobytes())
    return request


async def call(address: str, requests: list[triton.ModelInferRequest]) -> list[Answer]:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = triton_grpc.GRPCInferenceServiceStub(channel)

        async def one(request: triton.ModelInferRequest) -> Answer:
            try:
                return await stub.ModelInfer(request, timeout=120)
            except grpc.aio.AioRpcError as error:
                return error

        return await asyncio.gather(*(one(request) for request in requests))


def test_a_burst_past_a_tiny_queue_gets_unavailable_with_retry_after(tmp_path, tiny_checkpoint):
    port = free_port()
    environment = live_environment(tiny_checkpoint, APP_GRPC_PORT=str(port), APP_MAX_QUEUE="4",
                                   APP_MAX_BATCH_FILES="4", APP_MAX_BATCH_SIZE="2")
    with live_server(tmp_path, environment) as server:
        answers = asyncio.run(call(f"127.0.0.1:{port}", [infer_request(4) for _ in range(32)]))
        refused = [answer for answer in answers if isinstance(answer, grpc.aio.AioRpcError)]
        served = [answer for answer in answers if not isinstance(answer, grpc.aio.AioRpcError)]
        assert refused and served, "the burst should both fill the queue and be served"
        for error in refused:
            assert error.code() is grpc.StatusCode.UNAVAILABLE, error
            assert "APP_MAX_QUEUE=4" in error.details()
            assert int(dict(error.trailing_metadata())["retry-after"]) >= 1
        for answer in served:
            assert np.frombuffer(answer.raw_output_contents[0], "<f4").shape == (40,)
        metrics = httpx.get(f"{server.url}/metrics").text
        assert f'inference_dropped_images_total{{reason="queue_full"}} {4.0 * len(refused)}' in metrics


def test_sigterm_finishes_the_grpc_calls_in_flight(tmp_path, tiny_checkpoint):
    port = free_port()
    environment = live_environment(tiny_checkpoint, APP_GRPC_PORT=str(port), APP_MAX_BATCH_SIZE="1",
                                   APP_MAX_BATCH_FILES="32")
    with live_server(tmp_path, environment) as stopping:
        async def in_flight() -> list[Answer]:
            calls = asyncio.create_task(call(f"127.0.0.1:{port}", [infer_request(32) for _ in range(4)]))
            async with httpx.AsyncClient(base_url=stopping.url, timeout=60) as client:
                async def queued() -> bool:  # 128 one-image passes: seconds of work once queued
                    metrics = (await client.get("/metrics")).text
                    return float(re.search(r"^inference_queue_images (\S+)$", metrics, re.MULTILINE).group(1)) > 0

                await eventually(queued, what="images of the calls in flight to queue", every_s=0.05)
            stopping.process.send_signal(signal.SIGTERM)
            return await calls

        answers = asyncio.run(in_flight())
        assert all(isinstance(answer, triton.ModelInferResponse) for answer in answers), answers
        assert all(list(answer.outputs[0].shape) == [32, 10] for answer in answers)
        assert stopping.process.wait(timeout=30) in (0, -signal.SIGTERM)
        assert not [line for line in stopping.log_lines() if '"level": "error"' in line]


def test_a_grpc_port_another_server_holds_stops_the_start(tmp_path, tiny_checkpoint):
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        environment = {key: value for key, value in os.environ.items() if not key.startswith("APP_")}
        environment |= live_environment(tiny_checkpoint, APP_GRPC_PORT=str(port),
                                        APP_STATE_DIR=str(tmp_path / "state"))
        finished = subprocess.run([sys.executable, "-m", "app", "--port", str(free_port())], cwd=REPO_ROOT,
                                  env=environment, capture_output=True, text=True, timeout=300)
    assert finished.returncode != 0
    assert f"the gRPC port {port} on 127.0.0.1 is already in use" in finished.stderr
    assert "APP_GRPC_PORT" in finished.stderr


def test_the_services_request_timeout_bounds_a_grpc_call_as_it_bounds_http(tmp_path, tiny_checkpoint):
    """APP_REQUEST_TIMEOUT_S far below one forward pass of 32 images one at a time: HTTP's 504 is gRPC's
    DEADLINE_EXCEEDED, with the service's own message (the client set no deadline)."""
    port = free_port()
    environment = live_environment(tiny_checkpoint, APP_GRPC_PORT=str(port), APP_REQUEST_TIMEOUT_S="0.01",
                                   APP_MAX_BATCH_SIZE="1", APP_MAX_BATCH_FILES="32")
    with live_server(tmp_path, environment) as server:
        [answer] = asyncio.run(call(f"127.0.0.1:{port}", [infer_request(32)]))
        assert isinstance(answer, grpc.aio.AioRpcError) and answer.code() is grpc.StatusCode.DEADLINE_EXCEEDED
        assert "APP_REQUEST_TIMEOUT_S" in answer.details()
        pixels = np.stack([images.pixels(32, 32, seed) for seed in range(32)])
        http = httpx.post(f"{server.url}/v2/models/{NAME}/infer", timeout=60, json={"inputs": [
            {"name": "pixels", "shape": list(pixels.shape), "datatype": "UINT8", "data": pixels.ravel().tolist()}]})
        assert http.status_code == 504 and "APP_REQUEST_TIMEOUT_S" in http.json()["error"]
