"""The network, its optimizer, schedule and EMA (a Learner), and one epoch of training steps."""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim.lr_scheduler import LambdaLR
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm import tqdm

from model.resnet import build_model
from training.augment import training_batch
from training.config import TrainingConfig
from training.data import ImageSet
from training.distributed import Worker
from training.optimizer import build_optimizer, build_scheduler
from training.sampling import epoch_batches, seeded_generator

PROGRESS_EVERY = 25  # steps between loss read-outs on the progress bar; each one waits for the GPU


@dataclass(frozen=True)
class Learner:
    """Everything one training step updates."""

    model: nn.Module          # the plain network: its state_dict is what state.pt and the checkpoint hold
    step_model: nn.Module     # what a step calls: ``model`` wrapped in DDP and/or torch.compile
    optimizer: torch.optim.SGD
    scheduler: LambdaLR
    ema: AveragedModel | None

    @property
    def evaluated_model(self) -> nn.Module:
        """The weights that are evaluated and shipped: the EMA's when there is one."""
        return self.ema.module if self.ema is not None else self.model

    def state_dict(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])


def build_learner(config: TrainingConfig, worker: Worker, steps_per_epoch: int) -> Learner:
    """Seeded, so every rank (and a resumed run, before its state is loaded) builds the same network."""
    torch.manual_seed(config.seed)
    model = build_model(config.arch, zero_init_residual=config.zero_init_residual)
    model = model.to(worker.device, memory_format=torch.channels_last)
    optimizer = build_optimizer(model, config)
    scheduler = build_scheduler(optimizer, config, steps_per_epoch)
    ema = None
    if config.ema:
        # use_buffers: BatchNorm running statistics are averaged too, so the EMA weights come with matching ones.
        ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(config.ema_decay), use_buffers=True)
    step_model: nn.Module = model
    if worker.world_size > 1:
        device_ids = [worker.device] if worker.device.type == "cuda" else None
        step_model = DistributedDataParallel(model, device_ids=device_ids)
    if config.compile:
        step_model = torch.compile(step_model)
    return Learner(model=model, step_model=step_model, optimizer=optimizer, scheduler=scheduler, ema=ema)


def smoothed_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, smoothing: float) -> torch.Tensor:
    """Cross-entropy against (1 - smoothing) * one-hot + smoothing / classes, as F.cross_entropy's
    label_smoothing computes it. Written out because NLLLoss, which F.cross_entropy uses, has no
    deterministic CUDA kernel and would make --deterministic fail (torch.use_deterministic_algorithms docs)."""
    log_probabilities = F.log_softmax(logits.float(), dim=1)
    true_class = log_probabilities.gather(1, labels[:, None]).squeeze(1)
    return -((1 - smoothing) * true_class + smoothing * log_probabilities.mean(1)).mean()


def train_step(
    learner: Learner,
    images: torch.Tensor,
    labels: torch.Tensor,
    generator: torch.Generator,
    config: TrainingConfig,
    autocast: Callable[[], AbstractContextManager],
) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step on a uint8 batch: augment, forward, backward, update. Returns (loss, logits)."""
    batch = training_batch(images, generator, config.cutout)
    with autocast():
        logits = learner.step_model(batch)
    loss = smoothed_cross_entropy(logits, labels, config.label_smoothing)
    learner.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    learner.optimizer.step()
    learner.scheduler.step()
    if learner.ema is not None:
        learner.ema.update_parameters(learner.model)
    return loss, logits


@dataclass(frozen=True)
class EpochResult:
    loss: float      # mean training loss (label-smoothed) over the epoch's images
    accuracy: float  # on the augmented training batches, as the network saw them during the epoch
    images: int      # images trained on, all ranks together
    seconds: float


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_one_epoch(
    learner: Learner,
    data: ImageSet,
    *,
    config: TrainingConfig,
    epoch: int,
    worker: Worker,
    autocast: Callable[[], AbstractContextManager],
) -> EpochResult:
    """Train on one epoch (0-based ``epoch``) of this rank's shard of the data, already on the device."""
    device = worker.device
    synchronize(device)
    start = time.perf_counter()
    batches = epoch_batches(len(data), config.batch_size, seed=config.seed, epoch=epoch, rank=worker.rank,
                            world_size=worker.world_size, device=device)
    generator = seeded_generator(device, config.seed, "augment", epoch, worker.rank)
    learner.step_model.train()
    # Sums stay on the device: reading them every step would stall the GPU's queue of kernels.
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device)
    progress = tqdm(total=len(batches), desc=f"epoch {epoch + 1}/{config.epochs}", unit="step", leave=False,
                    disable=None if worker.is_main else True)
    for step, indices in enumerate(batches):
        labels = data.labels[indices]
        loss, logits = train_step(learner, data.images[indices], labels, generator, config, autocast)
        loss_sum += loss.detach() * len(labels)
        correct += (logits.argmax(1) == labels).sum()
        progress.update()
        if not progress.disable and step % PROGRESS_EVERY == 0:
            progress.set_postfix(loss=f"{loss.item():.3f}", lr=f"{learner.scheduler.get_last_lr()[0]:.4f}")
    progress.close()
    images = batches.numel() * worker.world_size
    totals = worker.all_reduce_sum(torch.stack([loss_sum, correct]))
    synchronize(device)
    seconds = time.perf_counter() - start
    loss_total, correct_total = totals.tolist()
    return EpochResult(loss=loss_total / images, accuracy=correct_total / images, images=images, seconds=seconds)
