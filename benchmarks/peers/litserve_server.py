"""The LitServe peer: LitServe's own dynamic batching (``max_batch_size``, ``batch_timeout``) around the
same model, decoding and answer as the service (``benchmarks/peers/common.py``).

    PEER_WEIGHTS=weights/resnet50 PEER_PORT=8002 .venv-bench/bin/python -m benchmarks.peers.litserve_server

LitServe runs the HTTP front (uvicorn) and ``PEER_WORKERS`` inference worker processes, joined by queues
(multiprocessing Manager queues, or ZeroMQ with ``PEER_FAST_QUEUE=1``, LitServe's ``fast_queue``); a
request passes decode_request -> batch -> predict -> unbatch -> encode_response, the first and last per
request in the worker.
"""

from __future__ import annotations

import os

import litserve as ls
import numpy as np

from benchmarks.peers.common import Classifier, PeerSettings


class CifarAPI(ls.LitAPI):
    def __init__(self, settings: PeerSettings) -> None:
        super().__init__(max_batch_size=settings.max_batch_size, batch_timeout=settings.batch_timeout_ms / 1000)
        self.settings = settings

    def setup(self, device: str) -> None:
        self.classifier = Classifier(self.settings)

    def decode_request(self, request) -> np.ndarray:  # a multipart form: field "file", as our /predict
        return self.classifier.decode(request["file"].file.read())

    def batch(self, inputs: list[np.ndarray]) -> np.ndarray:
        return np.stack(inputs)

    def predict(self, pixels: np.ndarray) -> np.ndarray:
        return self.classifier.probabilities(pixels)

    def unbatch(self, output: np.ndarray) -> list[np.ndarray]:
        return list(output)

    def encode_response(self, probabilities: np.ndarray) -> dict:
        return self.classifier.answer(probabilities)


def main() -> None:
    settings = PeerSettings.from_environment()
    server = ls.LitServer(CifarAPI(settings), accelerator="cpu", workers_per_device=settings.workers,
                          timeout=60, healthcheck_path="/health",
                          fast_queue=os.environ.get("PEER_FAST_QUEUE", "0") == "1")
    server.run(host="127.0.0.1", port=settings.port, num_api_servers=1, generate_client_file=False,
               log_level="warning")


if __name__ == "__main__":
    main()
