import json
from pathlib import Path

from app.control.jobs.progress import MetricsFollower, tail_lines


def test_follower_reads_complete_lines_only_and_keeps_the_latest_epoch(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    follower = MetricsFollower(path)
    assert not follower.poll() and follower.progress(5).epoch == 0
    epoch = {"event": "epoch", "epoch": 1, "epochs": 5, "train_loss": 2.0, "test_accuracy": 0.2,
             "images_per_s": 10.0, "eta_s": 4.0, "train_accuracy": 0.1}
    path.write_text(json.dumps(epoch) + "\n" + '{"event": "epo')
    assert follower.poll()
    assert follower.progress(5).model_dump() == {"epoch": 1, "epochs": 5, "train_loss": 2.0,
                                                 "test_accuracy": 0.2, "images_per_s": 10.0, "eta_s": 4.0}
    with open(path, "a") as handle:
        handle.write('ch", "epoch": 2, "epochs": 5}\nnot json\n{"event": "final", "checkpoint": "c"}\n')
    assert follower.poll()
    assert follower.progress(5).epoch == 2 and follower.final == {"event": "final", "checkpoint": "c"}
    assert not follower.poll()


def test_tail_lines(tmp_path: Path) -> None:
    path = tmp_path / "log"
    assert tail_lines(path, 3) == ""
    path.write_text("".join(f"line {n}\n" for n in range(100_000)))
    assert tail_lines(path, 2) == "line 99998\nline 99999\n"
    assert tail_lines(path, 0) == ""
    assert tail_lines(path, None).count("\n") == 100_000


def test_follower_copes_with_a_resumed_run_cutting_the_file_back(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"event": "epoch", "epoch": n, "epochs": 9}) + "\n" for n in range(1, 4)]
    path.write_text("".join(lines))
    follower = MetricsFollower(path)
    follower.poll()
    assert follower.progress(9).epoch == 3
    # Resumed from the state saved after epoch 1: epochs 2 and 3 are redone.
    path.write_text(lines[0] + json.dumps({"event": "epoch", "epoch": 2, "epochs": 9, "train_loss": 0.5}) + "\n")
    assert follower.poll()
    assert follower.progress(9).epoch == 2 and follower.progress(9).train_loss == 0.5


def test_follower_reads_only_what_was_appended(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"event": "epoch", "epoch": n, "epochs": 900}) + "\n" for n in range(500)))
    follower = MetricsFollower(path)
    assert follower.poll() and follower.progress(900).epoch == 499
    parsed: list[bytes] = []
    real_loads = json.loads
    monkeypatch.setattr("app.control.jobs.progress.json.loads", lambda line: parsed.append(line) or real_loads(line))
    with open(path, "a") as handle:
        handle.write(json.dumps({"event": "epoch", "epoch": 500, "epochs": 900}) + "\n")
    assert follower.poll() and follower.progress(900).epoch == 500
    assert not follower.poll()
    assert len(parsed) == 1, "only the appended line is parsed, not the 500 before it"


def test_follower_starts_over_when_a_resume_cuts_the_file_back_and_it_grows_again(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"event": "epoch", "epoch": n, "epochs": 9}) + "\n" for n in range(1, 4)]
    path.write_text("".join(lines))
    follower = MetricsFollower(path)
    follower.poll()
    # Cut back to epoch 1, then epochs 2, 3 and 4 redone before the next poll: longer than before.
    redone = [json.dumps({"event": "epoch", "epoch": n, "epochs": 9, "train_loss": 0.5}) + "\n" for n in (2, 3, 4)]
    path.write_text(lines[0] + "".join(redone))
    assert follower.poll()
    assert follower.progress(9).epoch == 4 and follower.progress(9).train_loss == 0.5
