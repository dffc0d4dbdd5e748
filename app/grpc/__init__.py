"""The KServe v2 / Open Inference Protocol over gRPC (``inference.GRPCInferenceService``), in the service's own
process and event loop, on the same engine and classification pipeline as HTTP (``server.py`` starts it,
``service.py`` answers it). ``inference.proto`` is the protocol's definition; ``inference_pb2*`` are generated
from it (``python -m app.grpc.generate``)."""
