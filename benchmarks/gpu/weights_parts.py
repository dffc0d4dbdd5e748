"""Split a checkpoint's weights into parts small enough to come back from the GPU machine, and join them.

The device tool returns at most 8 files of at most 16 MiB, so the fp16 ResNet-50 weights (~45 MiB) travel
as numbered parts with a manifest of SHA-256 sums; `join` refuses any part, or a result, whose sum differs.

    python benchmarks/gpu/weights_parts.py split RUN/checkpoint OUTDIR
    python benchmarks/gpu/weights_parts.py join PARTS_DIR weights/resnet50   (also writes backends-cuda.json)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
from pathlib import Path

PART_BYTES = 15 * 1024 * 1024
MANIFEST = "weights_manifest.json"
WEIGHTS_FILE = "model.safetensors"
CARD_FILE = "card.json"
RESULTS_FILE = "results.json"
CUDA_BACKEND_REPORT = "backends-cuda.json"  # model.backend_report.report_file("cuda"); this script is stdlib-only


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def split(checkpoint: Path, out: Path, part_bytes: int = PART_BYTES) -> dict:
    data = (checkpoint / WEIGHTS_FILE).read_bytes()
    out.mkdir(parents=True, exist_ok=True)
    parts = []
    for index, start in enumerate(range(0, len(data), part_bytes)):
        chunk = data[start: start + part_bytes]
        name = f"{WEIGHTS_FILE}.part{index}"
        (out / name).write_bytes(chunk)
        parts.append({"name": name, "bytes": len(chunk), "sha256": sha256(chunk)})
    manifest = {"file": WEIGHTS_FILE, "bytes": len(data), "sha256": sha256(data), "parts": parts}
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    shutil.copy(checkpoint / CARD_FILE, out / CARD_FILE)
    return manifest


def join(parts_dir: Path, checkpoint: Path) -> Path:
    manifest = json.loads((parts_dir / MANIFEST).read_text())
    chunks = []
    for part in manifest["parts"]:
        chunk = (parts_dir / part["name"]).read_bytes()
        if sha256(chunk) != part["sha256"]:
            raise SystemExit(f"error: {part['name']} has the wrong SHA-256; fetch the GPU run's files again")
        chunks.append(chunk)
    data = b"".join(chunks)
    if sha256(data) != manifest["sha256"]:
        raise SystemExit("error: the joined weights have the wrong SHA-256")
    checkpoint.mkdir(parents=True, exist_ok=True)
    (checkpoint / WEIGHTS_FILE).write_bytes(data)
    shutil.copy(parts_dir / CARD_FILE, checkpoint / CARD_FILE)
    # The run's CUDA backend verification travels inside results.json (summarise.py), since only 8 files
    # come back; it is bound to the weights' SHA-256, which the service checks when it reads it.
    results = parts_dir / RESULTS_FILE
    # Absent (null) when the run stopped before training ended, an error object when it could not be read.
    backends = (json.loads(results.read_text()).get("backends") if results.is_file() else None) or {}
    if "weights_sha256" in backends:
        (checkpoint / CUDA_BACKEND_REPORT).write_text(json.dumps(backends, indent=2) + "\n")
    return checkpoint


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    split_parser = commands.add_parser("split", help="checkpoint dir -> parts + manifest + card")
    split_parser.add_argument("checkpoint", type=Path)
    split_parser.add_argument("out", type=Path)
    join_parser = commands.add_parser("join", help="parts dir -> checkpoint dir (SHA-256 checked)")
    join_parser.add_argument("parts_dir", type=Path)
    join_parser.add_argument("checkpoint", type=Path)
    args = parser.parse_args(argv)
    if args.command == "split":
        manifest = split(args.checkpoint, args.out)
        print(f"{len(manifest['parts'])} parts, {manifest['bytes']} bytes, sha256 {manifest['sha256']}")
    else:
        print(join(args.parts_dir, args.checkpoint))
    return 0


if __name__ == "__main__":
    sys.exit(main())
