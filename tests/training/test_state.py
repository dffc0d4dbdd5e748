import random

import pytest
import torch

from tests.support.durability import record_fsyncs
from training.state import StateError, load_state, restore_rng_states, rng_states, save_state


def test_state_round_trips_with_weights_only_loading_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "state.pt"
    save_state(path, {"epoch": 3, "weights": torch.arange(4.0), "rng": rng_states(), "config": {"arch": "x"}})
    loaded = load_state(path, torch.device("cpu"))
    assert loaded["epoch"] == 3 and torch.equal(loaded["weights"], torch.arange(4.0))
    assert [p.name for p in tmp_path.iterdir()] == ["state.pt"]


def test_restoring_rng_states_replays_the_same_draws(tmp_path):
    path = tmp_path / "state.pt"
    save_state(path, {"rng": rng_states()})
    expected = torch.rand(3), random.random()
    torch.manual_seed(123)
    random.seed(123)
    restore_rng_states(load_state(path, torch.device("cpu"))["rng"])
    again = torch.rand(3), random.random()
    assert torch.equal(expected[0], again[0]) and expected[1] == again[1]


def test_a_failed_write_keeps_the_previous_state(tmp_path):
    path = tmp_path / "state.pt"
    save_state(path, {"epoch": 1})
    with pytest.raises(Exception):
        save_state(path, {"epoch": 2, "unpicklable": lambda: None})
    assert load_state(path, torch.device("cpu"))["epoch"] == 1
    assert not path.with_suffix(".tmp").exists()


@pytest.mark.parametrize("content", [None, b"not a torch file"])
def test_missing_or_unreadable_state_is_a_state_error(tmp_path, content):
    path = tmp_path / "state.pt"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(StateError, match="state.pt"):
        load_state(path, torch.device("cpu"))


def test_the_state_reaches_the_disk_before_it_replaces_the_previous_one(tmp_path, monkeypatch):
    log = record_fsyncs(monkeypatch)
    path = tmp_path.resolve() / "state.pt"
    save_state(path, {"epoch": 1})
    assert log.durably_replaced(path)
