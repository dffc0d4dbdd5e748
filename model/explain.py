"""Grad-CAM heat maps (Selvaraju et al. 2017, "Grad-CAM: Visual Explanations from Deep Networks via
Gradient-based Localization"): which parts of an image made the network answer a class.

For the class score ``y_c`` (its logit) and the feature maps ``A_k`` of the last convolutional stage, each map
is weighted by its mean gradient, ``α_k = mean_ij ∂y_c/∂A_k[i, j]`` (eq. 1), and the heat map is
``ReLU(Σ_k α_k A_k)`` (eq. 2), upsampled bilinearly to the input's size and scaled so its peak is 1.

``grad_cam(model, batch, class_index, layer)`` is a pure function of a network in eval mode (as trained: not
the service's folded, inference-mode copy, which keeps no gradients). ``GRAD_CAM_LAYERS`` names the last
convolutional stage of every architecture of ``model.architectures``; a test runs each one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from model.cifar_resnet import DEPTHS
from model.resnet import BLOCKS

# The module whose output is the feature map Grad-CAM weighs, in the last convolutional stage of each
# architecture: the stage itself for the ResNets (4x4 for the ImageNet-width ones at 32x32 input, 8x8 for
# the CIFAR ones). fastcnn's last stage pools its first convolution's 7x7 output down to 3x3, and at 3x3 the
# peak of the upsampled map mostly sits at the centre cell whatever the image; its first convolution keeps
# 7x7. Measured with the shipped weights/fastcnn, each examples/*.png pasted into each corner of a plain
# 64x64 canvas and resized to 32x32: the peak fell in the object's quadrant for 36 of 40 with
# "layer3.conv1" against 34 of 40 with "layer3", where most of those hits were the centre pixel bordering
# the quadrant (tests/model/test_explain.py keeps the measurement).
GRAD_CAM_LAYERS: dict[str, str] = {
    **{name: "layer4" for name in BLOCKS},
    **{name: "layer3" for name in DEPTHS},
    "fastcnn": "layer3.conv1",
}


def grad_cam_layer(architecture: str) -> str:
    if architecture not in GRAD_CAM_LAYERS:
        raise ValueError(f"no Grad-CAM layer is known for architecture {architecture!r}; add its last "
                         f"convolutional stage to model.explain.GRAD_CAM_LAYERS")
    return GRAD_CAM_LAYERS[architecture]


@dataclass(frozen=True)
class GradCam:
    heatmaps: torch.Tensor      # (N, H, W) float32 in [0, 1] at the batch's spatial size; each peak is 1 (or all 0)
    logits: torch.Tensor        # (N, classes) float32, of the same forward pass
    class_index: torch.Tensor   # (N,) int64: the class each map explains


def grad_cam(model: nn.Module, batch: torch.Tensor, class_index: int | Sequence[int] | None,
             layer: str) -> GradCam:
    """Heat maps of ``batch`` (normalised, ``(N, 3, H, W)``) for ``class_index`` (one class for all, one per
    image, or None for each image's top class), from the output of ``model``'s submodule ``layer``.

    ``model`` must be in eval mode (a training-mode BatchNorm would mix the images' statistics); it is not
    changed, and no parameter gradient is computed: only the input requires one, which puts the feature
    map on the autograd graph.
    """
    if model.training:
        raise ValueError("grad_cam needs a model in eval mode: call model.eval() first")
    target = model.get_submodule(layer)
    captured: list[torch.Tensor] = []
    handle = target.register_forward_hook(lambda _module, _inputs, output: captured.append(output))
    try:
        with torch.enable_grad():
            logits = model(batch.detach().float().requires_grad_(True))
    finally:
        handle.remove()
    if len(captured) != 1:
        raise ValueError(f"{layer!r} ran {len(captured)} times in one forward pass; name a module that runs once")
    features = captured[0]
    classes = _classes(class_index, logits)
    score = logits.gather(1, classes[:, None]).sum()  # images are independent in eval mode: one backward for all
    (gradients,) = torch.autograd.grad(score, features)
    weights = gradients.mean(dim=(2, 3), keepdim=True)                     # α_k, eq. 1
    maps = F.relu((weights * features).sum(dim=1, keepdim=True))           # eq. 2
    maps = F.interpolate(maps, size=batch.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    peaks = maps.flatten(1).amax(dim=1).clamp_min(torch.finfo(maps.dtype).tiny)
    return GradCam(heatmaps=(maps / peaks[:, None, None]).detach(), logits=logits.detach(), class_index=classes)


def _classes(class_index: int | Sequence[int] | None, logits: torch.Tensor) -> torch.Tensor:
    count, classes = logits.shape
    if class_index is None:
        return logits.detach().argmax(dim=1)
    chosen = torch.as_tensor([class_index] * count if isinstance(class_index, int) else list(class_index),
                             dtype=torch.int64, device=logits.device)
    if chosen.shape != (count,) or bool(((chosen < 0) | (chosen >= classes)).any()):
        raise ValueError(f"class_index must be one class, or one per image, from 0 to {classes - 1}")
    return chosen
