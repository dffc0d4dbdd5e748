"""Inference-only forms of a trained network: ``prepare_for_inference(model, device, backend)``.

It returns a module to call under ``torch.inference_mode()`` on a normalised float32 batch
``(N, 3, 32, 32)`` (fastest in channels_last) that gives float32 logits ``(N, classes)``. The CPU backends,
chosen by what ``benchmarks/cpu_backends.py`` measured (benchmarks/README.md has the table):

- ``fused`` (the default): every BatchNorm2d folded into the Conv2d before it, in channels_last. An exact
  rewrite (``γ(Wx − μ)/σ + β`` is again a convolution), so it keeps the model's accuracy: outputs agree
  with the unfolded model to float32 rounding. The fold follows each architecture's known blocks, without
  tracing (``fold_batchnorm``).
- ``eager``: the model as trained, in channels_last; the reference the others are checked against.
- ``onnx`` (needs ``pip install -e '.[onnx]'``): the model exported with ``torch.onnx`` and run by ONNX
  Runtime's CPU provider. Exact like ``fused`` (ONNX Runtime folds BatchNorm itself) and faster, most of
  all at small batches, but it adds ONNX Runtime to the service's dependencies.
- ``bf16``: the fused model in bfloat16, for CPUs with native bf16 dot products (AVX512-BF16, AMX);
  inputs are cast to bf16 and logits back to float32.
- ``int8``: the fused model with static post-training int8 quantization (``quantize_int8``), calibrated on
  ``calibration`` images (``model.calibration_set`` keeps them next to a checkpoint).

``bf16`` and ``int8`` are much faster but change the numbers (bf16 keeps 8 bits of mantissa, int8 rounds
every activation to 1/256 of its calibrated range): how much that costs a checkpoint's test accuracy on a
given machine is what ``python -m training.verify_backends`` measures (``model.backend_report``).

On CUDA every backend is ``eager``: the GPU path is the engine's own (bf16 autocast over channels_last).
"""

from __future__ import annotations

import concurrent.futures
import copy
import importlib.util
import multiprocessing
import os
import signal
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Literal

import torch
from torch import fx, nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from model.child_process import end_with_parent
from model.cifar_resnet import CifarBasicBlock, CifarResNet
from model.fastcnn import ConvStage
from model.features import LogitsAndFeatures
from model.resnet import BasicBlock, Bottleneck, ResNet

Backend = Literal["eager", "fused", "onnx", "bf16", "int8"]
BACKENDS: tuple[str, ...] = ("eager", "fused", "onnx", "bf16", "int8")
DEFAULT_CPU_BACKEND: Backend = "fused"
CALIBRATION_IMAGES = 256  # training images that int8 observes activation ranges on


def prepare_for_inference(
    model: nn.Module,
    device: str | torch.device = "cpu",
    backend: str = DEFAULT_CPU_BACKEND,
    calibration: torch.Tensor | Sequence[torch.Tensor] | None = None,
    *,
    tracing: Callable[[], AbstractContextManager] = nullcontext,
    with_features: bool = False,
) -> nn.Module:
    """``model`` made ready for inference on ``device`` with ``backend``; ``model`` itself is not changed
    (beyond moving to ``device``, eval mode and, for ``eager``, channels_last). ``calibration``:
    normalised training images, int8 only. ``with_features``: the module returns ``(logits, stage1,
    penultimate)`` (``model.features.LogitsAndFeatures``; ``joined`` makes them logits and features), the logits
    the same as without it, for an OOD rule that reads the features.

    ``tracing`` is entered around the one step that traces the model with torch.fx, int8's
    ``prepare_fx``: fx's tracer patches ``nn.Module.__call__`` for the whole process while it runs, so a
    forward pass on another thread then fails. A caller that runs passes meanwhile (the engine) passes a
    context that holds them back; every other step, calibration and the ONNX export (in a child process:
    ``export_onnx``) included, runs alongside them (``tests/model/test_inference.py`` checks both).
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown inference backend {backend!r}; choose one of: {', '.join(BACKENDS)}")
    device = torch.device(device)
    model = model.to(device).eval()
    if with_features:
        model = LogitsAndFeatures(model).eval()
    if device.type != "cpu" or backend == "eager":
        return model.to(memory_format=torch.channels_last)
    if backend == "onnx":
        return OnnxRuntimeModule(model)
    fused = fold_batchnorm(model)
    if backend == "fused":
        return fused.to(memory_format=torch.channels_last)
    if backend == "bf16":
        # torch's type stubs have no to(dtype=..., memory_format=...) overload; nn.Module.to takes both.
        return BFloat16(fused.to(dtype=torch.bfloat16, memory_format=torch.channels_last))  # type: ignore[call-overload]
    if calibration is None:
        raise ValueError("the int8 backend needs calibration images: pass a few hundred normalised "
                         "training images as calibration=")
    return quantize_int8(fused, calibration, tracing=tracing)


def available_cpu_backends() -> tuple[tuple[str, ...], dict[str, str]]:
    """The CPU backends this process can prepare, and for each one it cannot, why."""
    missing: dict[str, str] = {}
    if importlib.util.find_spec("onnxruntime") is None:
        missing["onnx"] = "ONNX Runtime is not installed (pip install -e '.[onnx]')"
    if "x86" not in torch.backends.quantized.supported_engines:
        missing["int8"] = "this build of torch lacks the x86 quantized engine"
    return tuple(name for name in BACKENDS if name not in missing), missing


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """A copy of ``model`` in which each BatchNorm2d that reads only a Conv2d's output is folded into that
    convolution's weight and bias, and replaced by ``nn.Identity``; the copy is of the same class.

    The model must be in eval mode: its running statistics are what folds. Which BatchNorm reads which
    convolution is known, not traced: ``_FOLDS`` says it for every block of ``model.architectures``, and
    in an ``nn.Sequential`` (the projection shortcuts) each child reads only the one before it. A
    BatchNorm anywhere else stays as it is, which is still exact, only slower. Without tracing nothing
    process-wide is patched, so folding is safe while other threads run forward passes (torch.fx's tracer
    patches ``nn.Module.__call__`` for the whole process, which failed concurrent passes).
    """
    if model.training:
        raise ValueError("fold_batchnorm needs a model in eval mode: call model.eval() first, since only "
                         "the running statistics can be folded into the convolution")
    folded = copy.deepcopy(model)
    for module in list(folded.modules()):
        if type(module) is nn.Sequential:
            names = list(module._modules)
            pairs: tuple[_Fold, ...] = tuple(_Fold(conv, batchnorm) for conv, batchnorm in zip(names, names[1:]))
        else:
            pairs = _FOLDS.get(type(module), ())
        for pair in pairs:
            _fold_pair(module, pair)
    return folded


@dataclass(frozen=True)
class _Fold:
    """In its module's forward, ``batchnorm`` reads ``conv``'s output and nothing else does, either
    directly or through the MaxPool2d ``max_pool``."""

    conv: str
    batchnorm: str
    max_pool: str | None = None


# One entry per block class of model.architectures, each a fact about that class's forward. The tests
# compare every architecture's folded model with the unfolded one, so a forward that changes without
# this table fails a test rather than an answer. fastcnn's first BatchNorm of a stage comes after a
# max-pool: y -> s*y + t with a per-channel s >= 0 commutes with taking a maximum over a window of one
# channel (max(s*a + t, s*b + t) = s*max(a, b) + t), so it folds into the convolution before the pool.
_FOLDS: dict[type[nn.Module], tuple[_Fold, ...]] = {
    ResNet: (_Fold("conv1", "bn1"),),
    BasicBlock: (_Fold("conv1", "bn1"), _Fold("conv2", "bn2")),
    Bottleneck: (_Fold("conv1", "bn1"), _Fold("conv2", "bn2"), _Fold("conv3", "bn3")),
    CifarResNet: (_Fold("conv1", "bn1"),),
    CifarBasicBlock: (_Fold("conv1", "bn1"), _Fold("conv2", "bn2")),
    ConvStage: (_Fold("conv1", "bn1", max_pool="pool"), _Fold("conv2", "bn2")),
}


def _fold_pair(parent: nn.Module, pair: _Fold) -> None:
    conv, batchnorm = getattr(parent, pair.conv, None), getattr(parent, pair.batchnorm, None)
    if not (isinstance(conv, nn.Conv2d) and isinstance(batchnorm, nn.BatchNorm2d) and _foldable_batchnorm(batchnorm)):
        return
    if pair.max_pool is not None:
        if not isinstance(getattr(parent, pair.max_pool, None), nn.MaxPool2d):
            return
        if not bool((_batchnorm_scale(batchnorm) >= 0).all()):
            return  # a negative scale turns a maximum into a minimum: this one cannot move before the pool
    setattr(parent, pair.conv, fuse_conv_bn_eval(conv, batchnorm))
    setattr(parent, pair.batchnorm, nn.Identity())


def _foldable_batchnorm(module: object) -> bool:
    return (isinstance(module, nn.BatchNorm2d) and type(module).forward is nn.BatchNorm2d.forward
            and module.running_mean is not None and module.running_var is not None and not module.training)


def _batchnorm_scale(batchnorm: nn.BatchNorm2d) -> torch.Tensor:
    assert batchnorm.running_var is not None  # _foldable_batchnorm checked it
    scale = torch.rsqrt(batchnorm.running_var + batchnorm.eps)
    return scale if batchnorm.weight is None else scale * batchnorm.weight.detach()


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
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        options.inter_op_num_threads = 1
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = onnxruntime.InferenceSession(export_onnx(model, size), options,
                                                    providers=["CPUExecutionProvider"])

    def forward(self, batch: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        # ONNX Runtime takes C-contiguous NCHW arrays: a channels_last batch is copied once here.
        images = batch.detach().float().contiguous().cpu().numpy()
        outputs = self.session.run(None, {"images": images})
        # One output (logits) as a tensor; several (LogitsAndFeatures) as the tuple the module returned.
        return torch.from_numpy(outputs[0]) if len(outputs) == 1 else tuple(torch.from_numpy(o) for o in outputs)


def export_onnx(model: nn.Module, size: int = 32) -> bytes:
    """``model`` as a serialised ONNX program taking float32 ``(N, 3, size, size)``, N from 1 to 4096,
    exported by torch.onnx's dynamo exporter in a child process.

    Why a child: the export is seconds of Python (tracing, decomposing, translating each node) and holds
    this process's GIL for most of it. In the service it runs during a hot swap, beside the event loop and
    the decoding threads, which then waited for the GIL: back-to-back ONNX swaps raised p99 3.2x
    (benchmarks/README.md, "Hot swaps under load"). The child is spawned (a fork of a process that runs
    threads is unsafe), from the calling thread, whose niceness it inherits on Linux, and gets the model
    by pickle over the pipe between the two processes, never from a file. It is killed if this process dies
    first (``model.child_process``): nobody would read what it exports.
    """
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=context, initializer=end_with_parent,
                                                initargs=(signal.SIGKILL, os.getpid())) as child:
        try:
            return child.submit(_export_onnx_here, model, size).result()
        except concurrent.futures.process.BrokenProcessPool:
            raise RuntimeError("the process that exports the model to ONNX died (out of memory?); use the "
                               "fused backend, or give the service more memory") from None


def _export_onnx_here(model: nn.Module, size: int) -> bytes:
    torch.set_num_threads(1)  # the exporter is Python-bound; leave the cores to the serving model
    batch = torch.export.Dim("batch", min=1, max=4096)
    example = torch.zeros(2, 3, size, size)
    names = ["logits", "stage1", "penultimate"] if isinstance(model, LogitsAndFeatures) else ["logits"]
    program = torch.onnx.export(model, (example,), dynamo=True, dynamic_shapes=({0: batch},),
                                input_names=["images"], output_names=names, verbose=False)
    assert program is not None  # dynamo=True always returns the exported program
    return program.model_proto.SerializeToString()


class BFloat16(nn.Module):
    """Runs a bfloat16 module on float32 inputs and returns float32 outputs."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, batch: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        outputs = self.module(batch.to(torch.bfloat16))
        return outputs.float() if isinstance(outputs, torch.Tensor) else tuple(o.float() for o in outputs)


def quantize_int8(model: nn.Module, calibration: torch.Tensor | Sequence[torch.Tensor], *,
                  tracing: Callable[[], AbstractContextManager] = nullcontext) -> fx.GraphModule:
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
    with tracing():  # prepare_fx traces the model (see prepare_for_inference)
        prepared = prepare_fx(copy.deepcopy(model).eval(), get_default_qconfig_mapping("x86"), (batches[0],))
    with torch.no_grad():  # observers keep ordinary tensors, which convert_fx reads afterwards
        for batch in batches:
            prepared(batch)
    return convert_fx(prepared)
