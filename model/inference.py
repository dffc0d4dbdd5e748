"""Inference-only forms of a trained network: ``prepare_for_inference(model, device, backend)``.

It returns a module to call under ``torch.inference_mode()`` on a normalised float32 batch
``(N, 3, 32, 32)`` (fastest in channels_last) that gives float32 logits ``(N, classes)``. The CPU backends,
chosen by what ``benchmarks/cpu_backends.py`` measured (README "Benchmarks" has the table):

- ``fused`` (the default): every BatchNorm2d folded into the Conv2d before it, in channels_last. An exact
  rewrite (``γ(Wx − μ)/σ + β`` is again a convolution), so it keeps the model's accuracy: outputs agree
  with the unfused model to float32 rounding.
- ``eager``: the model as trained, in channels_last; the reference the others are checked against.
- ``onnx`` (opt-in, needs ``pip install -e '.[onnx]'``): the model exported with ``torch.onnx`` and run by
  ONNX Runtime's CPU provider. Exact like ``fused`` (ONNX Runtime folds BatchNorm itself) and faster,
  most of all at small batches, but it adds ONNX Runtime to the service's dependencies.
- ``bf16`` (opt-in): the fused model in bfloat16, for CPUs with native bf16 dot products (AVX512-BF16,
  AMX); inputs are cast to bf16 and logits back to float32.
- ``int8`` (opt-in): the fused model with static post-training int8 quantization (``quantize_int8``),
  calibrated on ``calibration`` images.

``bf16`` and ``int8`` are much faster but change the numbers (bf16 keeps 8 bits of mantissa, int8 rounds
every activation to 1/256 of its calibrated range): they stay opt-in until a trained checkpoint's test
accuracy with them has been measured (``benchmarks/cpu_backends.py --weights``) and found within 0.3
points of float32; no trained checkpoint existed when they were written.

On CUDA every backend is ``eager``: the GPU path is the engine's own (bf16 autocast over channels_last).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Literal

import torch
from torch import fx, nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

Backend = Literal["eager", "fused", "onnx", "bf16", "int8"]
BACKENDS: tuple[str, ...] = ("eager", "fused", "onnx", "bf16", "int8")
DEFAULT_CPU_BACKEND: Backend = "fused"
CALIBRATION_IMAGES = 256  # training images that int8 observes activation ranges on


def prepare_for_inference(
    model: nn.Module,
    device: str | torch.device = "cpu",
    backend: str = DEFAULT_CPU_BACKEND,
    calibration: torch.Tensor | Sequence[torch.Tensor] | None = None,
) -> nn.Module:
    """``model`` made ready for inference on ``device`` with ``backend``; ``model`` itself is not changed
    (beyond moving to ``device`` and eval mode). ``calibration``: normalised training images, int8 only."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown inference backend {backend!r}; choose one of: {', '.join(BACKENDS)}")
    device = torch.device(device)
    model = model.to(device).eval()
    if device.type != "cpu" or backend == "eager":
        return model.to(memory_format=torch.channels_last)
    if backend == "onnx":
        return OnnxRuntimeModule(model)
    fused = fold_batchnorm(model)
    if backend == "fused":
        return fused.to(memory_format=torch.channels_last)
    if backend == "bf16":
        return BFloat16(fused.to(dtype=torch.bfloat16, memory_format=torch.channels_last))
    if calibration is None:
        raise ValueError("the int8 backend needs calibration images: pass a few hundred normalised "
                         "training images as calibration=")
    return quantize_int8(fused, calibration)


def fold_batchnorm(model: nn.Module) -> fx.GraphModule:
    """A copy of ``model`` in which each BatchNorm2d that reads only a Conv2d's output is folded into that
    convolution's weight and bias. The model must be in eval mode: its running statistics are what folds.

    The graph is traced with torch.fx, so the fold follows data flow, not module names; a BatchNorm whose
    convolution also feeds another node is left alone, since folding would change that node's input.
    """
    if model.training:
        raise ValueError("fold_batchnorm needs a model in eval mode: call model.eval() first, since only "
                         "the running statistics can be folded into the convolution")
    tracer = _ConvBatchNormTracer()
    graph = tracer.trace(copy.deepcopy(model))
    graph_module = fx.GraphModule(tracer.root, graph, type(model).__name__)
    modules = dict(graph_module.named_modules())
    for node in list(graph_module.graph.nodes):
        if node.op != "call_module" or not isinstance(modules[node.target], nn.BatchNorm2d):
            continue
        source = node.args[0]
        if not (isinstance(source, fx.Node) and source.op == "call_module"
                and isinstance(modules[source.target], nn.Conv2d) and len(source.users) == 1):
            continue
        fused = fuse_conv_bn_eval(modules[source.target], modules[node.target])
        _replace_submodule(graph_module, source.target, fused)
        node.replace_all_uses_with(source)
        graph_module.graph.erase_node(node)
    graph_module.graph.eliminate_dead_code()
    graph_module.delete_all_unused_submodules()
    graph_module.recompile()
    return graph_module


class _ConvBatchNormTracer(fx.Tracer):
    """torch.fx's tracer, keeping every Conv2d and BatchNorm2d as one call, subclasses too. The default
    keeps only torch.nn's own classes whole and traces into a subclass defined elsewhere (fastcnn's
    ShiftOnlyBatchNorm), where BatchNorm's input-dimension check stops the trace with a TraceError."""

    def is_leaf_module(self, module: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(module, (nn.Conv2d, nn.BatchNorm2d)) or super().is_leaf_module(module, module_qualified_name)


def _replace_submodule(root: nn.Module, qualified_name: str, replacement: nn.Module) -> None:
    parent_name, _, child_name = qualified_name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child_name, replacement)


class OnnxRuntimeModule(nn.Module):
    """``model`` exported to ONNX and run by an ONNX Runtime session: float32 NCHW in, float32 logits out.

    The session uses torch's current intra-op thread count, so it follows the engine's thread plan, and
    it may be called from several threads at once (ONNX Runtime sessions are thread-safe for ``run``).
    """

    def __init__(self, model: nn.Module, size: int = 32) -> None:
        super().__init__()
        try:
            import onnxruntime
        except ImportError:
            raise RuntimeError("the onnx backend needs ONNX Runtime: pip install -e '.[onnx]', or use the "
                               "fused backend") from None
        batch = torch.export.Dim("batch", min=1, max=4096)
        example = torch.zeros(2, 3, size, size)
        program = torch.onnx.export(model, (example,), dynamo=True, dynamic_shapes=({0: batch},),
                                    input_names=["images"], output_names=["logits"], verbose=False)
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        options.inter_op_num_threads = 1
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = onnxruntime.InferenceSession(program.model_proto.SerializeToString(), options,
                                                    providers=["CPUExecutionProvider"])

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        # ONNX Runtime takes C-contiguous NCHW arrays: a channels_last batch is copied once here.
        images = batch.detach().float().contiguous().cpu().numpy()
        return torch.from_numpy(self.session.run(None, {"images": images})[0])


class BFloat16(nn.Module):
    """Runs a bfloat16 module on float32 inputs and returns float32 outputs."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        return self.module(batch.to(torch.bfloat16)).float()


def quantize_int8(model: nn.Module, calibration: torch.Tensor | Sequence[torch.Tensor]) -> fx.GraphModule:
    """Static post-training int8 quantization in FX graph mode with torch's ``x86`` engine (oneDNN's VNNI
    kernels on AVX-512 CPUs, fbgemm's on AVX2), activation ranges observed on ``calibration``.

    Weights are per-channel symmetric int8 and activations per-tensor uint8 (the x86 defaults); each
    Conv2d(+BatchNorm)+ReLU chain runs as one quantized kernel. Needs no package beyond torch (PT2E
    quantization, the newer path, lives in torchao).
    """
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    if "x86" not in torch.backends.quantized.supported_engines:
        raise RuntimeError("the int8 backend needs torch's x86 quantized engine, which this build of torch "
                           "lacks; use the fused backend")
    torch.backends.quantized.engine = "x86"
    batches = list(calibration.split(32)) if isinstance(calibration, torch.Tensor) else list(calibration)
    if not batches:
        raise ValueError("calibration is empty: pass a few hundred normalised training images")
    prepared = prepare_fx(copy.deepcopy(model).eval(), get_default_qconfig_mapping("x86"), (batches[0],))
    with torch.no_grad():  # observers keep ordinary tensors, which convert_fx reads afterwards
        for batch in batches:
            prepared(batch)
    return convert_fx(prepared)
