"""A training run from start (or resume) to checkpoint, and the evaluation of a saved checkpoint."""

from __future__ import annotations

import os
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from model.card import Calibration
from model.checkpoint import load_checkpoint, save_checkpoint
from training.cli import Command
from training.config import TrainingConfig, write_config
from training.data import CifarSplits, ImageSet, load_cifar10, load_split, test_set_fingerprint
from training.distributed import Worker, main_first, resolve_device, start_distributed, stop_distributed
from training.evaluate import Evaluation, evaluate, predict
from training.interrupt import Interrupted
from training.layout import (
    CHECKPOINT_DIR,
    CONFIG_FILE,
    CONFUSION_FILE,
    CURVES_FILE,
    METRICS_FILE,
    PREDICTIONS_FILE,
    RELIABILITY_FILE,
    STATE_FILE,
)
from training.loop import Diverged, Learner, build_learner, non_finite_weights, train_one_epoch
from training.metrics import MetricsLog, epoch_log_line, read_metrics
from training.plots import GRID_IMAGES, plot_confusion_matrix, plot_curves, plot_predictions, plot_reliability
from training.precision import autocast_for, resolve_precision
from training.provenance import device_name, git_commit
from training.state import load_state, restore_rng_states, rng_states, save_state
from training.trust import (
    NO_HOLDOUT,
    calibration_line,
    calibration_record,
    fit_trust,
    holdout_description,
    write_ood_statistics,
)
from training.verify_backends import VerificationSettings, table, verify_checkpoint

# How the end of a run measures the backends: the command's defaults (tests make it quicker).
VERIFICATION = VerificationSettings()


class TrainingError(RuntimeError):
    """The configuration does not fit the data or the saved state; the message says what to change."""


def evaluation_autocast(device: torch.device, precision: str) -> Callable[[], AbstractContextManager]:
    """Evaluation computes as the service serves: on CUDA in bf16 autocast (the CUDA engine's path), on a CPU in
    float32 whatever the training precision (the CPU engine's default backend is exact float32), so the
    card's accuracy is the one the service's answers have."""
    return autocast_for(device, precision if device.type == "cuda" else "fp32")


def configure_backends(config: TrainingConfig) -> None:
    if config.deterministic:
        # cuBLAS needs a fixed workspace to be deterministic; it reads this when its first handle is made.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    # cuDNN autotuning picks the fastest convolution per shape (every step has the same shape), but the
    # algorithm it picks may differ between runs.
    torch.backends.cudnn.benchmark = not config.deterministic


def run_training(command: Command) -> dict[str, Any]:
    """Train (or resume) the run in ``command.run_dir``; returns the "final" metrics record."""
    configure_backends(command.config)
    worker = start_distributed(command.config.device)
    try:
        return TrainingRun(command, worker).execute()
    finally:
        stop_distributed()


class TrainingRun:
    def __init__(self, command: Command, worker: Worker) -> None:
        assert command.run_dir is not None  # parse_command requires it for training
        self.config, self.run_dir, self.resume, self.worker = command.config, command.run_dir, command.resume, worker
        self.precision = resolve_precision(command.config.precision, worker.device)
        self.autocast = autocast_for(worker.device, self.precision)
        self.eval_autocast = evaluation_autocast(worker.device, self.precision)
        self.git_commit = git_commit()
        self.finished_epochs = 0
        self.train_seconds = 0.0

    def execute(self) -> dict[str, Any]:
        config, worker = self.config, self.worker
        with main_first(worker):
            data = load_cifar10(config.data_dir, download=config.download,
                                skip_integrity_check=config.skip_integrity_check, train_limit=config.train_limit,
                                test_limit=config.test_limit, holdout=config.holdout, holdout_from=config.holdout_from)
        steps_per_epoch = len(data.train) // config.batch_size
        if steps_per_epoch == 0 or config.batch_size % worker.world_size:
            raise TrainingError(f"--batch-size {config.batch_size} must be at most the {len(data.train)} training "
                                f"images and split evenly over {worker.world_size} process(es)")
        train = data.train.to(worker.device)
        test = worker.shard(data.test).to(worker.device)
        holdout = worker.shard(data.holdout).to(worker.device) if data.holdout else None
        learner = build_learner(config, worker, steps_per_epoch, data.train.images)
        log = self._open_log(learner)
        log.write("resumed" if self.resume else "start", epoch=self.finished_epochs, epochs=config.epochs,
                  steps_per_epoch=steps_per_epoch, train_images=len(data.train),
                  holdout_images=len(data.holdout) if data.holdout else 0, test_images=len(data.test),
                  world_size=worker.world_size, device=device_name(worker.device), precision=self.precision)
        if not self.resume:
            self._save_state(learner, log)  # epoch 0, so that --resume always has something to continue
        try:
            evaluations = self._train_epochs(learner, log, train, test, holdout)
            return self._finish(learner, log, data, *evaluations)
        except Interrupted as stop:
            log.write("interrupted", signal=stop.signal_name, finished_epochs=self.finished_epochs)
            raise
        finally:
            log.close()

    def _open_log(self, learner: Learner) -> MetricsLog:
        """Fresh: write config.json and start metrics.jsonl afresh. Resumed: load state.pt into ``learner``
        and cut metrics.jsonl back to where it was when that state was saved."""
        path = self.run_dir / METRICS_FILE if self.worker.is_main else None
        if not self.resume:
            if self.worker.is_main:
                write_config(self.run_dir, self.config, git_commit=self.git_commit, torch_version=torch.__version__)
            return MetricsLog(path, truncate_to=0)
        state = load_state(self.run_dir / STATE_FILE, self.worker.device)
        if not _same_config(state["config"], self.config):
            raise TrainingError(f"{self.run_dir / STATE_FILE} was written with another configuration than "
                                f"{self.run_dir / CONFIG_FILE}; start a new --run-dir")
        learner.load_state_dict(state["learner"])
        restore_rng_states(state["rng"])
        self.finished_epochs, self.train_seconds = state["epoch"], state["train_seconds"]
        return MetricsLog(path, truncate_to=state["metrics_offset"])

    def _save_state(self, learner: Learner, log: MetricsLog) -> None:
        if self.worker.is_main:
            save_state(self.run_dir / STATE_FILE, {
                "config": self.config.to_dict(), "epoch": self.finished_epochs, "train_seconds": self.train_seconds,
                "metrics_offset": log.offset, "learner": learner.state_dict(), "rng": rng_states(),
            })

    def _evaluate(self, learner: Learner, data: ImageSet | None, tta: bool) -> Evaluation | None:
        if data is None:
            return None
        return evaluate(learner.evaluated_model, data, tta=tta, autocast=self.eval_autocast,
                        all_reduce_sum=self.worker.all_reduce_sum)

    def _train_epochs(self, learner: Learner, log: MetricsLog, train: ImageSet, test: ImageSet,
                      holdout: ImageSet | None) -> tuple[Evaluation, Evaluation | None]:
        """Train the remaining epochs; returns the last epoch's test and holdout evaluations."""
        config, first = self.config, self.finished_epochs
        test_result = holdout_result = None
        for epoch in range(first, config.epochs):
            result = train_one_epoch(learner, train, config=config, epoch=epoch, worker=self.worker,
                                     autocast=self.autocast,
                                     announce_speed=epoch == first and self.worker.device.type == "cpu")
            self.finished_epochs, self.train_seconds = epoch + 1, self.train_seconds + result.seconds
            last = self.finished_epochs == config.epochs
            test_result = holdout_result = None
            if last or (config.eval_every and self.finished_epochs % config.eval_every == 0):
                test_result = self._evaluate(learner, test, tta=last and config.tta)
                holdout_result = self._evaluate(learner, holdout, tta=False)
            seconds_per_epoch = self.train_seconds / self.finished_epochs
            extra = {"validation_accuracy": _accuracy_or_none(holdout_result)} if holdout else {}
            record = log.write(
                "epoch", epoch=self.finished_epochs, epochs=config.epochs, train_loss=result.loss,
                train_accuracy=result.accuracy, test_accuracy=_accuracy_or_none(test_result), **extra,
                images_per_s=result.images / result.seconds, epoch_seconds=result.seconds,
                eta_s=seconds_per_epoch * (config.epochs - self.finished_epochs),
                lr=learner.scheduler.get_last_lr()[0],
            )
            if self.worker.is_main:
                tqdm.write(epoch_log_line(record))
            if last or self.finished_epochs % config.checkpoint_every == 0:
                self._save_state(learner, log)
        if test_result is None:  # resumed after the last epoch's state was saved: only the report is missing
            test_result = self._evaluate(learner, test, tta=config.tta)
            holdout_result = self._evaluate(learner, holdout, tta=False)
        assert test_result is not None  # evaluated above: the test set is never empty
        return test_result, holdout_result

    def _finish(self, learner: Learner, log: MetricsLog, data: CifarSplits, test_result: Evaluation,
                holdout_result: Evaluation | None) -> dict[str, Any]:
        """Checkpoint, plots and the "final" record, all from the final epoch's weights (never the best)."""
        config = self.config
        checkpoint = self.run_dir / CHECKPOINT_DIR
        accuracies = {"test_accuracy": test_result.accuracy, "test_accuracy_tta": test_result.accuracy_tta,
                      "per_class_accuracy": test_result.per_class_accuracy}
        device = device_name(self.worker.device)
        if self.worker.world_size > 1:
            device = f"{self.worker.world_size} x {device}"
        if broken := non_finite_weights(learner.evaluated_model):
            raise Diverged(f"{len(broken)} weight tensor(s) hold NaN or infinity ({', '.join(broken[:3])})",
                           config.epochs, None, learner.scheduler.get_last_lr()[0])
        calibration = None
        if self.worker.is_main:
            calibration = self._calibrate(learner, data, checkpoint)
            save_checkpoint(
                learner.evaluated_model, checkpoint, architecture=config.arch, dtype=config.weights_dtype,
                training=config.to_dict(), **accuracies, epochs=config.epochs,
                train_seconds=round(self.train_seconds, 3), device=device, precision=self.precision,
                git_commit=self.git_commit,
                data_provenance=data.provenance, calibration=calibration,
                test_set_sha256=test_set_fingerprint(data.test),
            )
            if config.plots:
                self._plot(learner, data.test, test_result)
            if config.verify_backends:
                self._verify_backends(checkpoint, data, log)
        final = log.write("final", **accuracies,
                          validation_accuracy=_accuracy_or_none(holdout_result),
                          test_images=test_result.count, epochs=config.epochs,
                          train_seconds=self.train_seconds, checkpoint=str(checkpoint),
                          **calibration_record(calibration))
        if self.worker.is_main:
            print(summary_line(final), flush=True)
        return final

    def _calibrate(self, learner: Learner, data: CifarSplits, checkpoint: Path) -> Calibration | None:
        """The temperature and OOD rule, fitted on the full holdout (main process only), or None without one."""
        if data.holdout is None:
            tqdm.write(NO_HOLDOUT)
            return None
        fit = fit_trust(learner.evaluated_model, data.holdout, data.test, device=self.worker.device,
                        autocast=self.eval_autocast, git_commit=self.git_commit,
                        fitted_on=holdout_description(data.holdout_start, len(data.holdout)), train=data.train)
        write_ood_statistics(fit, checkpoint)  # before save_checkpoint writes the card that names it
        if self.config.plots:
            plot_reliability(fit.test_before, fit.test_after, fit.calibration.temperature,
                             self.run_dir / RELIABILITY_FILE)
        return fit.calibration

    def _verify_backends(self, checkpoint: Path, data: CifarSplits, log: MetricsLog) -> None:
        """The checkpoint's backend report and calibration set (training.verify_backends), on the device
        this run trained on, and a "backends" record summarising it."""
        if self.config.test_limit is not None:
            tqdm.write("backend verification skipped: --test-limit leaves part of the test set out, and a "
                       "backend's accuracy is verified on all of it")
            return
        tqdm.write(f"verifying the inference backends on {len(data.test)} test images "
                   "(--no-verify-backends skips this)")
        report, path = verify_checkpoint(
            checkpoint, data.test.images, data.test.labels, data.train.images[:VERIFICATION.calibration_images],
            self.worker.device, VERIFICATION, log=tqdm.write,
            calibration_source=f"the first {VERIFICATION.calibration_images} training images of this run "
                               f"(after --train-limit and --holdout), from {Path(self.config.data_dir).resolve()}",
            # The holdout ships as the verification set, so a service on another machine can verify the
            # backends there without the test set (app/engine/self_verification.py).
            verification=None if data.holdout is None else (
                data.holdout.images, data.holdout.labels,
                f"the holdout of this run: the last {len(data.holdout)} training images, never trained on"),
        )
        tqdm.write(table(report))
        log.write("backends", report=str(path), test_images=report.test_images, skipped=report.skipped,
                  backends={row.backend: {"accuracy": row.accuracy, "agreement": row.agreement,
                                          "max_probability_diff": row.max_probability_diff,
                                          "images_per_s": row.images_per_s, "startup_s": row.startup_s}
                            for row in report.backends})

    def _plot(self, learner: Learner, test: ImageSet, test_result: Evaluation) -> None:
        epochs = [record for record in read_metrics(self.run_dir / METRICS_FILE) if record["event"] == "epoch"]
        plot_curves(epochs, self.run_dir / CURVES_FILE)
        write_evaluation_plots(learner.evaluated_model, test, test_result, self.run_dir, self.eval_autocast,
                               self.worker.device)


def _same_config(stored: dict[str, Any], config: TrainingConfig) -> bool:
    """Whether a state.pt's configuration is ``config``; an option added since it was saved counts as its
    default, as it does when config.json is read."""
    try:
        return TrainingConfig(**stored) == config
    except TypeError:  # an option this code no longer has
        return False


def _accuracy_or_none(result: Evaluation | None) -> float | None:
    return None if result is None else result.accuracy


def write_evaluation_plots(model: torch.nn.Module, test: ImageSet, result: Evaluation, run_dir: Path,
                           autocast: Callable[[], AbstractContextManager], device: torch.device) -> None:
    plot_confusion_matrix(result.confusion, run_dir / CONFUSION_FILE)
    sample = test.take(0, GRID_IMAGES)
    predictions = predict(model, sample.images.to(device), autocast)
    plot_predictions(sample.images, sample.labels, predictions, run_dir / PREDICTIONS_FILE)


def summary_line(record: dict[str, Any]) -> str:
    line = f"test accuracy {100 * record['test_accuracy']:.2f} %"
    if record.get("test_accuracy_tta") is not None:
        line += f", with flip-TTA {100 * record['test_accuracy_tta']:.2f} %"
    if record.get("validation_accuracy") is not None:
        line += f"; validation accuracy {100 * record['validation_accuracy']:.2f} %"
    line += f" ({record['test_images']} test images)"
    if "train_seconds" in record:
        line += f"; {record['train_seconds']:.1f} s of training"
    if "checkpoint" in record:
        line += f"; checkpoint {record['checkpoint']}"
    per_class = ", ".join(f"{name} {100 * value:.1f}" for name, value in record["per_class_accuracy"].items())
    line = f"{line}\nper class (%): {per_class}"
    if "calibration" in record:
        line += f"\n{calibration_line(record['calibration'])}"
    return line


def run_evaluation(command: Command) -> dict[str, Any]:
    """--eval-only: the test accuracy of a checkpoint; with --run-dir, also an "evaluation" record and plots."""
    config = command.config
    assert command.weights is not None  # parse_command requires it with --eval-only
    configure_backends(config)
    device = resolve_device(config.device)
    checkpoint = load_checkpoint(command.weights, device)
    model = checkpoint.model.to(memory_format=torch.channels_last)
    test = load_split(config.data_dir, train=False, download=config.download,
                      skip_integrity_check=config.skip_integrity_check).take(0, config.test_limit)
    autocast = evaluation_autocast(device, resolve_precision(config.precision, device))
    result = evaluate(model, test.to(device), tta=config.tta, autocast=autocast)
    log_path = None
    if command.run_dir is not None:
        command.run_dir.mkdir(parents=True, exist_ok=True)
        log_path = command.run_dir / METRICS_FILE
    log = MetricsLog(log_path)
    record = log.write("evaluation", weights=str(command.weights), model_version=checkpoint.card.version,
                       test_accuracy=result.accuracy, test_accuracy_tta=result.accuracy_tta,
                       per_class_accuracy=result.per_class_accuracy, test_images=result.count)
    log.close()
    if command.run_dir is not None and config.plots:
        write_evaluation_plots(model, test, result, command.run_dir, autocast, device)
    print(summary_line(record), flush=True)
    return record
