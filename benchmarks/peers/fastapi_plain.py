"""The plain FastAPI server a tutorial writes: one forward pass per request, no batching.

    PEER_WEIGHTS=weights/resnet50 PEER_PORT=8001 .venv-bench/bin/python -m benchmarks.peers.fastapi_plain

The endpoint is a plain ``def``, so FastAPI runs it on its thread pool and several batch-1 passes can run at
once; ``PEER_WORKERS`` uvicorn processes each hold a copy of the model (the knobs compare.py tunes). The
model, decoding and answer are the service's own (``benchmarks/peers/common.py``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated

import uvicorn
from fastapi import FastAPI, File, Request, UploadFile

from benchmarks.peers.common import Classifier, PeerSettings

settings = PeerSettings.from_environment()


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    app.state.classifier = Classifier(settings)  # each uvicorn worker process loads its own copy
    yield


app = FastAPI(title="plain FastAPI peer", lifespan=lifespan)


@app.post("/predict")
def predict(request: Request, file: Annotated[UploadFile, File()]) -> dict:
    classifier: Classifier = request.app.state.classifier
    pixels = classifier.decode(file.file.read())
    return classifier.answer(classifier.probabilities([pixels])[0])


@app.get("/health")
def health() -> dict:
    return {"status": "ok"}


if __name__ == "__main__":
    uvicorn.run("benchmarks.peers.fastapi_plain:app", host="127.0.0.1", port=settings.port,
                workers=settings.workers, access_log=False, log_level="warning")
