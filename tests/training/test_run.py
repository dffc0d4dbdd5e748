"""Whole runs on the synthetic data: what a run writes, resuming, evaluating a checkpoint, torchrun."""

import json
import os
import shutil
import signal
import subprocess
import sys

import torch

from model.checkpoint import load_checkpoint
from model.labels import CLASS_NAMES
from tests.support import REPO_ROOT
from tests.training.conftest import tiny_run_args
from training.__main__ import main
from training.metrics import read_metrics

EPOCH_KEYS = {"event", "epoch", "epochs", "train_loss", "train_accuracy", "test_accuracy", "images_per_s",
              "epoch_seconds", "eta_s", "time"}
FINAL_KEYS = {"event", "test_accuracy", "test_accuracy_tta", "per_class_accuracy", "train_seconds", "checkpoint"}


def test_two_epochs_lower_the_loss_and_write_every_artefact(trained_run):
    records = read_metrics(trained_run / "metrics.jsonl")
    assert all("event" in record for record in records)
    epochs = [record for record in records if record["event"] == "epoch"]
    assert [record["epoch"] for record in epochs] == [1, 2]
    for record in epochs:
        assert EPOCH_KEYS <= record.keys() and record["epochs"] == 2
        assert record["images_per_s"] > 0 and record["epoch_seconds"] > 0
    assert epochs[1]["train_loss"] < epochs[0]["train_loss"]
    assert epochs[0]["test_accuracy"] is None, "only the final epoch is evaluated by default"
    final = records[-1]
    assert final["event"] == "final" and FINAL_KEYS <= final.keys()
    assert final["test_accuracy"] == epochs[1]["test_accuracy"], "the final epoch's accuracy, not another"
    assert final["test_accuracy"] > 0.3, "the synthetic classes are easy: far above the 10 % of chance"
    assert set(final["per_class_accuracy"]) == set(CLASS_NAMES)

    config = json.loads((trained_run / "config.json").read_text())
    assert config["config"]["arch"] == "resnet18" and config["config"]["epochs"] == 2
    assert "git_commit" in config

    state = torch.load(trained_run / "state.pt", weights_only=True)
    assert state["epoch"] == 2

    checkpoint = load_checkpoint(final["checkpoint"])
    card = checkpoint.card
    assert (card.architecture, card.epochs) == ("resnet18", 2)
    assert card.test_accuracy == final["test_accuracy"] and card.test_accuracy_tta == final["test_accuracy_tta"]
    assert card.per_class_accuracy == final["per_class_accuracy"]
    assert card.training["batch_size"] == 16 and card.train_seconds > 0
    assert card.device.startswith("CPU") and "MD5 check skipped" in card.data_provenance
    assert card.precision == "fp32" and card.training["precision"] == "fp32"

    for plot in ("curves.png", "confusion_matrix.png", "test_predictions.png"):
        assert (trained_run / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", plot


def test_resume_after_one_epoch_equals_the_uninterrupted_run(trained_run, synthetic_cifar10, tmp_path,
                                                             monkeypatch):
    import training.run

    save_state = training.run.save_state

    def save_then_receive_sigterm(path, state):
        save_state(path, state)
        if state["epoch"] == 1:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(training.run, "save_state", save_then_receive_sigterm)
    run_dir = tmp_path / "run"
    assert main(tiny_run_args(synthetic_cifar10, run_dir, "--no-plots")) == 128 + signal.SIGTERM
    assert torch.load(run_dir / "state.pt", weights_only=True)["epoch"] == 1
    assert not (run_dir / "checkpoint").exists()

    monkeypatch.setattr(training.run, "save_state", save_state)
    assert main(["--resume", "--run-dir", str(run_dir)]) == 0

    resumed, uninterrupted = read_metrics(run_dir / "metrics.jsonl"), read_metrics(trained_run / "metrics.jsonl")
    assert [r["event"] for r in resumed] == ["start", "epoch", "resumed", "epoch", "final"]
    for key in ("train_loss", "train_accuracy", "test_accuracy"):
        assert [r[key] for r in resumed if r["event"] == "epoch"] == \
               [r[key] for r in uninterrupted if r["event"] == "epoch"], key
    for key in ("test_accuracy", "test_accuracy_tta", "per_class_accuracy"):
        assert resumed[-1][key] == uninterrupted[-1][key], key
    ours, theirs = load_checkpoint(run_dir / "checkpoint"), load_checkpoint(trained_run / "checkpoint")
    assert ours.card.weights_sha256 == theirs.card.weights_sha256, "bit-identical final weights"


def test_resuming_a_finished_run_only_reports_again(trained_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(trained_run, run_dir)
    shutil.rmtree(run_dir / "checkpoint")
    assert main(["--resume", "--run-dir", str(run_dir)]) == 0
    records = read_metrics(run_dir / "metrics.jsonl")
    assert [r["event"] for r in records][-2:] == ["resumed", "final"]
    assert records[-1]["test_accuracy"] == read_metrics(trained_run / "metrics.jsonl")[-1]["test_accuracy"]
    assert load_checkpoint(run_dir / "checkpoint").card.epochs == 2


def test_eval_only_reports_a_checkpoints_accuracy(trained_run, synthetic_cifar10, tmp_path, capsys):
    out = tmp_path / "eval"
    assert main(["--eval-only", "--weights", str(trained_run / "checkpoint"), "--data-dir", str(synthetic_cifar10),
                 "--skip-integrity-check", "--device", "cpu", "--run-dir", str(out)]) == 0
    assert "test accuracy" in capsys.readouterr().out
    (record,) = read_metrics(out / "metrics.jsonl")
    final = read_metrics(trained_run / "metrics.jsonl")[-1]
    assert record["event"] == "evaluation"
    assert record["test_accuracy"] == final["test_accuracy"]
    assert record["test_accuracy_tta"] == final["test_accuracy_tta"]
    assert (out / "confusion_matrix.png").is_file()


def test_eval_only_with_a_broken_checkpoint_is_one_error_line(trained_run, synthetic_cifar10, tmp_path, capsys):
    broken = tmp_path / "checkpoint"
    shutil.copytree(trained_run / "checkpoint", broken)
    (broken / "model.safetensors").write_bytes(b"garbage")
    assert main(["--eval-only", "--weights", str(broken), "--data-dir", str(synthetic_cifar10),
                 "--skip-integrity-check", "--device", "cpu"]) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "SHA-256" in lines[0]


def test_holdout_is_reported_as_validation_accuracy(synthetic_cifar10, tmp_path):
    run_dir = tmp_path / "run"
    assert main(tiny_run_args(synthetic_cifar10, run_dir, "--epochs", "1", "--holdout", "20", "--no-plots",
                              "--test-limit", "10", "--ema", "--no-tta")) == 0
    records = read_metrics(run_dir / "metrics.jsonl")
    assert records[0]["train_images"] == 44 and records[0]["holdout_images"] == 20
    epoch, final = records[-2], records[-1]
    assert 0 <= epoch["validation_accuracy"] <= 1 and final["validation_accuracy"] == epoch["validation_accuracy"]
    assert final["test_accuracy_tta"] is None and final["test_images"] == 10
    assert not (run_dir / "curves.png").exists()


def test_torchrun_with_two_processes_shards_the_work_and_only_rank_0_writes(synthetic_cifar10, tmp_path):
    run_dir = tmp_path / "run"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    result = subprocess.run([*torchrun, "-m", "training", *tiny_run_args(synthetic_cifar10, run_dir),
                             "--epochs", "1", "--no-plots"],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    records = read_metrics(run_dir / "metrics.jsonl")
    assert [r["event"] for r in records] == ["start", "epoch", "final"], "one writer, not two"
    assert records[0]["world_size"] == 2
    assert records[-1]["test_images"] == 20, "the two test shards add up to the whole test set"
    assert load_checkpoint(run_dir / "checkpoint").card.device.startswith("2 x ")


def test_the_card_fingerprints_the_exact_test_images_it_was_scored_on(trained_run, synthetic_cifar10):
    from training.data import load_split, test_set_fingerprint

    card = load_checkpoint(trained_run / "checkpoint").card
    test = load_split(synthetic_cifar10, train=False, skip_integrity_check=True)
    assert card.test_set_sha256 == test_set_fingerprint(test.take(0, 20))  # TINY_RUN's --test-limit 20
    assert card.test_set_sha256 != test_set_fingerprint(test)
