import json

import pytest

from training.config import CONFIG_FILE, TrainingConfig, parse_command, write_config


def _usage_error(capsys, argv) -> str:
    with pytest.raises(SystemExit) as raised:
        parse_command(argv)
    assert raised.value.code == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    return lines[0]


def test_defaults_resolve_to_the_documented_recipe(tmp_path):
    command = parse_command(["--data-dir", str(tmp_path), "--run-dir", str(tmp_path / "run")])
    config = command.config
    assert (config.arch, config.epochs, config.batch_size) == ("resnet50", 35, 512)
    assert config.lr == pytest.approx(0.4) and config.label_smoothing == 0.1 and config.weight_decay == 5e-4
    assert config.tta and not config.ema and not config.compile
    assert not command.resume and not command.eval_only


@pytest.mark.parametrize("argv, fragment", [
    (["--epochs", "0"], "--epochs"),
    (["--batch-size", "1"], "--batch-size"),
    (["--lr", "-0.1"], "--lr"),
    (["--label-smoothing", "1"], "--label-smoothing"),
    (["--device", "gpu"], "--device"),
    (["--warmup-epochs", "50"], "--warmup-epochs"),
    (["--cutout", "40"], "--cutout"),
    (["--weights", "x"], "--eval-only"),
])
def test_bad_options_are_one_line_usage_errors(capsys, tmp_path, argv, fragment):
    line = _usage_error(capsys, ["--data-dir", str(tmp_path), "--run-dir", str(tmp_path / "run"), *argv])
    assert fragment in line


def test_run_dir_is_required_for_training(capsys, tmp_path):
    assert "--run-dir" in _usage_error(capsys, ["--data-dir", str(tmp_path)])


def test_a_new_run_refuses_a_run_dir_that_holds_a_run(capsys, tmp_path):
    (tmp_path / "state.pt").write_bytes(b"")
    assert "--resume" in _usage_error(capsys, ["--data-dir", str(tmp_path), "--run-dir", str(tmp_path)])


def test_resume_reads_the_stored_configuration(tmp_path):
    stored = TrainingConfig(data_dir=str(tmp_path), epochs=7, arch="resnet18", batch_size=64)
    write_config(tmp_path, stored, git_commit=None)
    assert json.loads((tmp_path / CONFIG_FILE).read_text())["config"]["lr"] == pytest.approx(0.05)
    command = parse_command(["--resume", "--run-dir", str(tmp_path), "--epochs", "7"])
    assert command.resume and command.config == stored


def test_resume_refuses_an_option_that_contradicts_the_stored_one(capsys, tmp_path):
    write_config(tmp_path, TrainingConfig(data_dir=str(tmp_path), epochs=7), git_commit=None)
    line = _usage_error(capsys, ["--resume", "--run-dir", str(tmp_path), "--epochs", "9"])
    assert "--epochs 9" in line and "7" in line


def test_resume_without_a_run_is_a_usage_error(capsys, tmp_path):
    assert "config.json" in _usage_error(capsys, ["--resume", "--run-dir", str(tmp_path)])
