"""SGD with Nesterov momentum, weight decay on weights only, and a warm-up-then-decay-to-zero schedule."""

from __future__ import annotations

import functools
import math

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from training.config import TrainingConfig


def parameter_groups(model: nn.Module, weight_decay: float, lr: float, norm_lr_scale: float = 1.0) -> list[dict]:
    """Conv and linear weights get weight decay; BatchNorm scales/shifts and biases (every tensor of rank <= 1)
    get none: decaying them only fights the normalisation (Goyal et al. 2017; "bag of tricks", He et al.
    2019, arXiv:1812.01187, section 3.1). Those small tensors may also learn at a multiple of the rate
    (``norm_lr_scale``): a network whose BatchNorms learn only a shift (model.fastcnn) needs it."""
    decayed: list[nn.Parameter] = []
    undecayed: list[nn.Parameter] = []
    for parameter in model.parameters():
        if parameter.requires_grad:
            (decayed if parameter.ndim > 1 else undecayed).append(parameter)
    return [
        {"params": decayed, "weight_decay": weight_decay, "lr": lr, "name": "weights"},
        {"params": undecayed, "weight_decay": 0.0, "lr": lr * norm_lr_scale, "name": "norms_and_biases"},
    ]


def build_optimizer(model: nn.Module, config: TrainingConfig) -> torch.optim.SGD:
    return torch.optim.SGD(
        parameter_groups(model, config.weight_decay, config.peak_lr, config.norm_lr_scale),
        lr=config.peak_lr, momentum=config.momentum, nesterov=True,
    )


def lr_factor(step: int, *, warmup_steps: int, total_steps: int, decay: str) -> float:
    """The multiple of the peak rate used at optimizer step ``step`` (0-based).

    Linear warm-up reaches the peak at the last warm-up step; then linear or cosine decay reaches exactly
    zero at ``total_steps``, so the last step runs at a tiny rate. Linear-to-zero matches or beats cosine at
    short budgets (Defazio et al. 2023, arXiv:2310.07831), hence the default.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if decay == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0 - progress


def build_scheduler(optimizer: torch.optim.Optimizer, config: TrainingConfig, steps_per_epoch: int) -> LambdaLR:
    """Stepped once per optimizer step; its state (the step count) goes into state.pt with the optimizer's."""
    factor = functools.partial(
        lr_factor,
        warmup_steps=round(config.warmup_epochs * steps_per_epoch),
        total_steps=config.epochs * steps_per_epoch,
        decay=config.lr_decay,
    )
    return LambdaLR(optimizer, factor)
