"""``ClientShares``: each client's images waiting, its share, and the back-off it was told to keep."""

from __future__ import annotations

from app.engine import client_shares
from app.engine.client_shares import ClientShares


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_share_counts_only_that_clients_waiting_images():
    shares = ClientShares(4)
    shares.add("a", 3)
    shares.add("b", 4)
    assert not shares.over_share("a", 1) and shares.over_share("a", 2)
    assert shares.over_share("b", 1) and not shares.over_share(None, 100)
    shares.remove("b", 4)
    assert not shares.over_share("b", 4) and shares.waiting("b") == 0
    shares.remove("a", 3)
    assert not shares


def test_no_limit_means_no_share_and_no_back_off():
    shares = ClientShares(0)
    shares.add("a", 1000)
    shares.refused("a", 5)
    assert not shares.over_share("a", 1000) and shares.backing_off("a") == 0


def test_a_refused_client_backs_off_for_its_retry_after_and_no_longer():
    clock = Clock()
    shares = ClientShares(2, clock=clock)
    shares.refused("a", 3)
    assert shares.backing_off("a") == 3 and shares.backing_off("b") == 0
    clock.now += 2.5
    assert shares.backing_off("a") == 0.5
    clock.now += 0.5
    assert shares.backing_off("a") == 0


def test_remembered_refusals_are_bounded(monkeypatch):
    monkeypatch.setattr(client_shares, "MAX_REMEMBERED_REFUSALS", 3)
    shares = ClientShares(2, clock=Clock())
    for name in "abcd":
        shares.refused(name, 10)
    assert shares.backing_off("a") == 0, "the oldest refusal was kept past the bound"
    assert all(shares.backing_off(name) == 10 for name in "bcd")
