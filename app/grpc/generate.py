"""Regenerate ``inference_pb2.py``, ``inference_pb2.pyi`` and ``inference_pb2_grpc.py`` from ``inference.proto``:
``python -m app.grpc.generate`` from the repository root (needs grpcio-tools; the committed ones were made with
grpcio-tools 1.81.1).

The messages are registered in a descriptor pool of their own instead of protobuf's default one: the protocol
fixes their names (``inference.ModelInferRequest``), and tritonclient.grpc registers the same names in the
default pool, so a process that imported both (a test, a benchmark) would otherwise fail with "duplicate
symbol". Only the service's name travels on the wire, and it stays ``inference.GRPCInferenceService``.
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
PROTO = HERE / "inference.proto"
DEFAULT_POOL = "DESCRIPTOR = _descriptor_pool.Default().AddSerializedFile("
OWN_POOL = "DESCRIPTOR = _descriptor_pool.DescriptorPool().AddSerializedFile("


def main() -> None:
    from grpc_tools import protoc  # a build-time tool, not a dependency of the service

    arguments = ["protoc", f"-I{ROOT}", f"--python_out={ROOT}", f"--pyi_out={ROOT}", f"--grpc_python_out={ROOT}",
                 str(PROTO.relative_to(ROOT))]
    if protoc.main(arguments) != 0:
        sys.exit("protoc failed")
    messages = HERE / "inference_pb2.py"
    text = messages.read_text()
    if DEFAULT_POOL not in text:
        sys.exit(f"{messages} no longer registers its file with {DEFAULT_POOL!r}: update {__file__}")
    messages.write_text(text.replace(DEFAULT_POOL, OWN_POOL))


if __name__ == "__main__":
    main()
