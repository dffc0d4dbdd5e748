"""``POST /explain`` while a model swap is under way (issue 22): its passes run inside the engine's preparation
guard (``InferenceEngine.forward_pass``), so a model being traced holds them back, and a swap staged behind a
half-computed request neither fails nor delays them. Never a 500.

Both situations are built with gates, not sleeps: a torch.fx trace held open inside the real guard, and the
engine's own forward pass held with a request half computed."""

import asyncio
import threading

import pytest
import torch
from torch import fx, nn

import app.engine.served_model as served_model
from app.engine.served_model import ServedModel
from tests.support import images
from tests.support.service import running_app, service_settings
from tests.support.waiting import eventually

pytestmark = pytest.mark.anyio


def upload(seed: int) -> dict:
    return {"files": {"file": ("image.png", images.png(seed=seed), "image/png")}}


def waiting_in_the_guard(engine) -> int:
    """Threads blocked in the engine's preparation guard (CPython's Condition keeps its waiters)."""
    return len(engine._preparation_gate._condition._waiters)


async def test_an_explanation_asked_for_while_a_model_is_traced_waits_for_the_trace_and_succeeds(
        tiny_checkpoint, other_checkpoint, monkeypatch):
    """The new model's preparation runs a real torch.fx trace inside the guard (as int8's prepare_fx does)
    and holds it open: fx has patched nn.Module.__call__ for the whole process, so a pass of another network
    now fails ("module is not installed as a submodule"), which was a 500. The explanation waits instead,
    and answers, from the model serving, once the trace is over."""
    tracing, release = threading.Event(), threading.Event()

    class HeldTrace(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            tracing.set()
            release.wait(600)
            return x + 1

    prepare = served_model.prepare_for_inference

    def preparation_that_traces(*args, **kwargs):
        with kwargs["tracing"]():
            fx.symbolic_trace(HeldTrace())
        return prepare(*args, **kwargs)

    async with running_app(service_settings(tiny_checkpoint)) as (app, client):
        engine = app.state.engine
        old = engine.version
        monkeypatch.setattr(served_model, "prepare_for_inference", preparation_that_traces)
        swap = asyncio.ensure_future(engine.swap(other_checkpoint))
        try:
            await eventually(tracing.is_set, what="the new model's trace to start")
            explained = asyncio.ensure_future(client.post("/explain?format=json", **upload(1)))
            await eventually(lambda: explained.done() or waiting_in_the_guard(engine) == 1,
                             what="the explanation to reach its forward pass")
            assert not explained.done(), f"answered during the trace: {explained.result().status_code}"
        finally:
            release.set()
        response = await explained
        card = await swap
    assert response.status_code == 200, response.text
    assert response.json()["prediction"]["model_version"] == old != card.version


@pytest.fixture
def held_inference(monkeypatch):
    """The engine's forward passes (on its ``inference`` threads) wait for the returned event; the explain
    threads' passes and the candidate's warm-up run freely. The list counts the held passes."""
    original = ServedModel.outputs
    release, held = threading.Event(), []

    def outputs(self, batch):
        if threading.current_thread().name.startswith("inference"):
            held.append(len(batch))
            release.wait(600)
        return original(self, batch)

    monkeypatch.setattr(ServedModel, "outputs", outputs)
    yield release, held
    release.set()  # a failed test must not leave a device thread waiting for good


async def test_an_explanation_during_a_swap_staged_behind_a_half_computed_request_is_answered_at_once(
        tiny_checkpoint, other_checkpoint, held_inference):
    """A batch of four images in batches of two, its first pass held: the new model is prepared and staged,
    but waits until that request is finished. An explanation meanwhile answers at once from the model
    serving; once the swap is in, the next one is of the new model (its Grad-CAM copy rebuilt)."""
    release, held = held_inference
    files = [("files", (f"{seed}.png", images.png(seed=seed), "image/png")) for seed in range(4)]
    async with running_app(service_settings(tiny_checkpoint, max_batch_size=2)) as (app, client):
        engine = app.state.engine
        old = engine.version
        first = await client.post("/explain?format=json", **upload(1))  # builds this thread's copy of the old model
        try:
            batch = asyncio.ensure_future(client.post("/predict/batch", files=files))
            await eventually(lambda: held == [2], what="the batch's first pass to start")
            swap = asyncio.ensure_future(engine.swap(other_checkpoint))
            await eventually(lambda: engine._staged is not None or swap.done(), what="the new model to be staged")
            # A guard, not a measurement: the explanation takes well under a second; one that waited for the
            # staged model would wait for the held pass, for good.
            during = await asyncio.wait_for(client.post("/explain?format=json", **upload(2)), 60)
            assert not swap.done() and engine.version == old, "the swap went in with a request half computed"
        finally:
            release.set()
        card = await swap
        predicted = await batch
        after = await client.post("/explain?format=json", **upload(2))
    for response in (first, during, after):
        assert response.status_code == 200, response.text
    assert during.json()["prediction"]["model_version"] == old
    assert predicted.status_code == 200 and {p["model_version"] for p in predicted.json()["predictions"]} == {old}
    assert after.json()["prediction"]["model_version"] == card.version != old
    assert after.json()["heatmap_png_base64"] != during.json()["heatmap_png_base64"], "the new model's own map"
