"""The network, its optimizer, schedule and EMA (a Learner), and one epoch of training steps."""

from __future__ import annotations

import math
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

from model.architectures import build_model
from training.augment import normalize, training_batch
from training.config import TrainingConfig
from training.data import ImageSet
from training.distributed import Worker
from training.optimizer import build_optimizer, build_scheduler
from training.sampling import epoch_batches, seeded_generator

PROGRESS_EVERY = 25  # steps between loss read-outs on the progress bar; each one waits for the GPU
# Without a terminal the bar is off (tqdm's disable=None), so a log (a job's train.log, `| tee`) would show
# nothing until the first epoch ends, minutes in on a CPU: a plain progress line this often instead.
PROGRESS_LINE_EVERY_S = 30.0
# On a CPU an epoch can take many minutes (ResNet-50: about half an hour): after this many steps, timed from
# the second step on so the first step's one-off set-up is left out, the run says how long it will take.
ESTIMATE_AFTER_STEPS = 6
# Steps between checks that the loss is still finite. Each check reads one number from the device (a sync), so
# not every step; a diverged run then stops within this many steps rather than training to the end and
# shipping NaN weights (issue 22). Every epoch's end checks too, on the loss summed over all ranks.
DIVERGENCE_CHECK_EVERY = 20


class Diverged(RuntimeError):
    """The loss (or the weights) stopped being finite numbers: training cannot recover from that."""

    def __init__(self, what: str, epoch: int, step: int | None, lr: float | torch.Tensor) -> None:
        where = f"epoch {epoch}" + (f", step {step}" if step is not None else "")
        super().__init__(f"training diverged: {what} at {where} (learning rate {float(lr):.4g}); lower --lr or "
                         "--norm-lr-scale, or lengthen --warmup-epochs, and train again. No checkpoint was written")


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


# Training images a network with a data-dependent initialisation (model.fastcnn's whitening) looks at.
INIT_IMAGES = 5000


def build_learner(config: TrainingConfig, worker: Worker, steps_per_epoch: int,
                  train_images: torch.Tensor | None = None) -> Learner:
    """Seeded, so every rank (and a resumed run, before its state is loaded) builds the same network.
    ``train_images`` (uint8) feed a data-dependent initialisation where the network has one."""
    torch.manual_seed(config.seed)
    model = build_model(config.arch, zero_init_residual=config.zero_init_residual)
    initialize = getattr(model, "initialize_from_data", None)
    if initialize is not None and train_images is not None:
        initialize(normalize(train_images[:INIT_IMAGES].cpu()))
    # torch's type stubs have no to(device, memory_format=...) overload; nn.Module.to takes both.
    model = model.to(worker.device, memory_format=torch.channels_last)  # type: ignore[call-overload]
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
        step_model = torch.compile(step_model)  # type: ignore[assignment]  # an OptimizedModule, a Module
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
    batch = training_batch(images, generator, config.cutout, config.photo_augment)
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


def speed_estimate(seconds_per_step: float, steps_per_epoch: int, batch_size: int, epochs_left: int) -> str:
    epoch_seconds = seconds_per_step * steps_per_epoch
    return (f"measured {batch_size / seconds_per_step:.0f} images/s over the first steps: about "
            f"{_duration(epoch_seconds)} per epoch, {_duration(epoch_seconds * epochs_left)} for the "
            f"{epochs_left} epoch(s) left")


def progress_line(epoch: int, epochs: int, step: int, steps: int, loss: float, images_per_s: float) -> str:
    """``epoch 1/35: step 120/390 (31 %), loss 1.234, 412 images/s``; ``epoch`` 1-based."""
    return (f"epoch {epoch}/{epochs}: step {step}/{steps} ({100 * step / steps:.0f} %), loss {loss:.3f}, "
            f"{images_per_s:.0f} images/s")


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


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
    announce_speed: bool = False,
) -> EpochResult:
    """Train on one epoch (0-based ``epoch``) of this rank's shard of the data, already on the device.
    ``announce_speed``: print the expected time per epoch and for the rest of the run from the first steps."""
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
    timed_from = line_at = start
    lines = progress.disable and worker.is_main
    for step, indices in enumerate(batches):
        labels = data.labels[indices]
        loss, logits = train_step(learner, data.images[indices], labels, generator, config, autocast)
        loss_sum += loss.detach() * len(labels)
        correct += (logits.argmax(1) == labels).sum()
        progress.update()
        # The running sum stays non-finite once any step's loss was. Only alone: under DDP one rank raising
        # mid-epoch would leave the others waiting in an all-reduce, so there the epoch's end decides.
        if worker.world_size == 1 and step % DIVERGENCE_CHECK_EVERY == 0 and not torch.isfinite(loss_sum):
            raise Diverged(f"the loss became {loss.item()}", epoch + 1, step + 1, learner.scheduler.get_last_lr()[0])
        if announce_speed and worker.is_main and step in (0, ESTIMATE_AFTER_STEPS):
            synchronize(device)
            if step == 0:
                timed_from = time.perf_counter()
            else:
                seconds_per_step = (time.perf_counter() - timed_from) / ESTIMATE_AFTER_STEPS
                tqdm.write(speed_estimate(seconds_per_step, len(batches), config.batch_size,
                                          config.epochs - epoch))
        if not progress.disable and step % PROGRESS_EVERY == 0:
            progress.set_postfix(loss=f"{loss.item():.3f}", lr=f"{learner.scheduler.get_last_lr()[0]:.4f}")
        if lines and (now := time.perf_counter()) - line_at >= PROGRESS_LINE_EVERY_S:
            line_at = now
            rate = (step + 1) * config.batch_size * worker.world_size / (now - start)
            print(progress_line(epoch + 1, config.epochs, step + 1, len(batches), loss.item(), rate), flush=True)
    progress.close()
    images = batches.numel() * worker.world_size
    totals = worker.all_reduce_sum(torch.stack([loss_sum, correct]))
    synchronize(device)
    seconds = time.perf_counter() - start
    loss_total, correct_total = totals.tolist()
    if not math.isfinite(loss_total):
        raise Diverged(f"the epoch's mean loss is {loss_total / images}", epoch + 1, None,
                       learner.scheduler.get_last_lr()[0])
    return EpochResult(loss=loss_total / images, accuracy=correct_total / images, images=images, seconds=seconds)


def non_finite_weights(model: nn.Module) -> list[str]:
    """The names of ``model``'s parameters and buffers that hold a NaN or an infinity."""
    return [name for name, tensor in model.state_dict().items()
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())]
