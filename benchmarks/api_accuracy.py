"""Accuracy through the API: every CIFAR-10 test image sent to a running service, against its card's figure.

    .venv/bin/python -m benchmarks.api_accuracy                          # starts `python -m app` on the default model
    .venv/bin/python -m benchmarks.api_accuracy --weights weights/fastcnn-cpu
    .venv/bin/python -m benchmarks.api_accuracy --url http://127.0.0.1:8000   # a service that is already running

Each of the 10,000 test images is encoded as a PNG (lossless, so the service decodes the exact pixels the
card's evaluation saw) and posted once to ``POST /predict`` (``--concurrency`` clients at a time) and once
more, 64 to a request, to ``POST /predict/batch``. The answers' labels are compared with the true ones and
the two accuracies with what the service claims in ``GET /model``: its serving backend's test accuracy as
the checkpoint's backend report verified it (``backend_test_accuracy``; int8's, say), or without one the
card's float32 ``test_accuracy``; the run fails (exit 1) if either differs from it by more than
``--tolerance`` points. Every answer must also name
the model version of that card, so a swap in the middle of the run would be caught. A 503 (the engine's queue is
full) is sent again after the Retry-After it names, at most 20 times; the JSON counts them. Writes
``benchmarks/results/api_accuracy_<version>.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import sys
import tempfile
import time
from contextlib import nullcontext
from datetime import UTC, datetime
from pathlib import Path

import httpx
from PIL import Image

from benchmarks.gpu.server import service
from benchmarks.serve_load import describe_machine
from model.labels import CLASS_NAMES
from training.data import load_split
from training.provenance import git_commit

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS = REPO_ROOT / "benchmarks" / "results"
BATCH_FILES = 64
# A full queue answers 503 with Retry-After (app/engine): at concurrency 64, 16 requests of 64 images fill the
# default 256-image queue, so the client waits as told and sends again, a bounded number of times, rather than
# failing the whole run on the first one.
RETRIES_503 = 20
LONGEST_WAIT_S = 5.0


def retry_after_s(response: httpx.Response, attempt: int) -> float:
    """The wait the service asked for (Retry-After in seconds), else a doubling one; at most LONGEST_WAIT_S."""
    try:
        wait = float(response.headers["retry-after"])
    except (KeyError, ValueError):
        wait = 0.05 * 2 ** attempt
    return min(max(wait, 0.0), LONGEST_WAIT_S)


async def post(client: httpx.AsyncClient, path: str, files: list, retried: list[int]) -> httpx.Response:
    """POST ``files``; a 503 is sent again after the wait it names (up to RETRIES_503 times, each counted in
    ``retried``); any other error status, or the last 503, raises."""
    for attempt in range(RETRIES_503 + 1):
        response = await client.post(path, files=files)
        if response.status_code != 503 or attempt == RETRIES_503:
            return response.raise_for_status()
        retried.append(1)
        await asyncio.sleep(retry_after_s(response, attempt))
    raise AssertionError("unreachable")


def encode_png(image) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image.permute(1, 2, 0).numpy()).save(buffer, format="PNG")
    return buffer.getvalue()


async def predict_singly(client: httpx.AsyncClient, images: list[bytes], concurrency: int,
                         retried: list[int]) -> list[dict]:
    answers: list[dict] = [{}] * len(images)
    next_index = iter(range(len(images)))

    async def worker() -> None:
        for index in next_index:
            response = await post(client, "/predict", [("file", (f"{index}.png", images[index], "image/png"))],
                                  retried)
            answers[index] = response.json()

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return answers


async def predict_in_batches(client: httpx.AsyncClient, images: list[bytes], concurrency: int,
                             retried: list[int]) -> list[dict]:
    starts = list(range(0, len(images), BATCH_FILES))
    answers: list[list[dict]] = [[] for _ in starts]
    next_batch = iter(enumerate(starts))

    async def worker() -> None:
        for position, start in next_batch:
            files = [("files", (f"{start + i}.png", data, "image/png"))
                     for i, data in enumerate(images[start:start + BATCH_FILES])]
            response = await post(client, "/predict/batch", files, retried)
            answers[position] = response.json()["predictions"]

    await asyncio.gather(*(worker() for _ in range(max(1, concurrency // 4))))
    return [answer for batch in answers for answer in batch]


def score(answers: list[dict], labels: list[int], version: str) -> dict:
    versions = {answer["model_version"] for answer in answers}
    if versions != {version}:
        raise RuntimeError(f"answers came from {sorted(versions)}, not only from {version}: the model changed "
                           "during the run")
    correct = sum(CLASS_NAMES.index(answer["label"]) == label for answer, label in zip(answers, labels))
    return {"images": len(answers), "correct": correct, "accuracy": round(correct / len(answers), 6)}


async def measure(url: str, images: list[bytes], labels: list[int], concurrency: int) -> dict:
    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
        served = (await client.get("/model")).raise_for_status().json()
        retried: list[int] = []
        started = time.perf_counter()
        single = score(await predict_singly(client, images, concurrency, retried), labels, served["version"])
        single["seconds"] = round(time.perf_counter() - started, 2)
        single["retried_503"], retried = len(retried), []
        started = time.perf_counter()
        batch = score(await predict_in_batches(client, images, concurrency, retried), labels, served["version"])
        batch["seconds"] = round(time.perf_counter() - started, 2)
        batch["retried_503"] = len(retried)
    return {"model": served, "predict": single, "predict_batch": batch}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", help="a running service; default: start `python -m app` on --weights")
    parser.add_argument("--weights", type=Path, help="checkpoint for the service this script starts "
                        "(default: the service's own default)")
    parser.add_argument("--data-dir", type=Path, default=REPO_ROOT / ".cache" / "cifar10",
                        help="folder holding cifar-10-batches-py (default %(default)s)")
    parser.add_argument("--skip-integrity-check", action="store_true",
                        help="accept a rebuilt copy such as ../shared/cifar10 (see python -m training --help)")
    parser.add_argument("--concurrency", type=int, default=16, help="requests in flight (default %(default)s)")
    parser.add_argument("--tolerance", type=float, default=0.1,
                        help="largest allowed gap to the card's accuracy, in points (default %(default)s)")
    parser.add_argument("--test-limit", type=int, default=None,
                        help="only the first N test images (a dry run; the card's accuracy is on all of them)")
    parser.add_argument("--ready-timeout", type=float, default=300,
                        help="seconds the started service may take to load its model (default %(default)s); it "
                        "fails at once if the service exits or cannot load the checkpoint")
    parser.add_argument("--no-save", action="store_true", help="print only; write no JSON")
    parser.add_argument("--out", type=Path, help="where the JSON goes (default "
                        "benchmarks/results/api_accuracy_<version>.json)")
    args = parser.parse_args(argv)

    test = load_split(args.data_dir, train=False, skip_integrity_check=args.skip_integrity_check)
    images = [encode_png(image) for image in test.images[:args.test_limit]]
    labels = test.labels[:args.test_limit].tolist()
    # A state folder of its own, so that no registry version of an earlier run is served instead.
    state = tempfile.TemporaryDirectory(prefix="api_accuracy-")
    # A queue that holds every batch request in flight (concurrency / 4 of 64 images): the run measures accuracy,
    # not the queue's limit; the 503 retries stay for a service started elsewhere (--url).
    queue = max(256, max(1, args.concurrency // 4) * BATCH_FILES)
    environment = {"APP_STATE_DIR": state.name, "APP_MAX_QUEUE": str(queue)}
    weights = args.weights.resolve() if args.weights else None
    running = (nullcontext((args.url, None)) if args.url
               else service(weights, environment, ready_timeout_s=args.ready_timeout))
    with running as (url, _):
        result = asyncio.run(measure(url, images, labels, args.concurrency))

    # The serving backend's own verified accuracy when it has one (int8 is 0.2 points under float32, say),
    # else the card's float32 figure: the claim the service makes about its answers.
    backend_accuracy = result["model"].get("backend_test_accuracy")
    card_accuracy = result["model"]["test_accuracy"] if backend_accuracy is None else backend_accuracy
    print(f"model {result['model']['version']} on {result['model'].get('backend', '?')} (claimed test accuracy "
          f"{'unknown' if card_accuracy is None else f'{100 * card_accuracy:.2f} %'}; card, float32: "
          f"{result['model']['test_accuracy']})")
    failed = card_accuracy is None
    for route, key in (("POST /predict", "predict"), ("POST /predict/batch", "predict_batch")):
        figures = result[key]
        gap = None if card_accuracy is None else 100 * (figures["accuracy"] - card_accuracy)
        figures["gap_points"] = None if gap is None else round(gap, 3)
        failed = failed or gap is None or abs(gap) > args.tolerance
        print(f"{route:<20} {figures['correct']:>6} / {figures['images']} = {100 * figures['accuracy']:.2f} %"
              f"  ({'-' if gap is None else f'{gap:+.2f}'} points against the card, {figures['seconds']} s)")
    if not args.no_save:
        record = {"benchmark": "api_accuracy", "machine": describe_machine(), **result,
                  "tolerance_points": args.tolerance, "passed": not failed,
                  "command": " ".join(["python -m benchmarks.api_accuracy", *(argv or sys.argv[1:])]),
                  "git_commit": git_commit(), "created_at": datetime.now(UTC).isoformat(timespec="seconds")}
        path = args.out or RESULTS / f"api_accuracy_{result['model']['version']}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(record, indent=2) + "\n")
        print(f"wrote {path}")
    if failed:
        print(f"FAILED: an accuracy through the API differs from the card's by more than {args.tolerance} points",
              file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
