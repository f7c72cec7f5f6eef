"""The CPU probe of ``--overlap auto`` (monoquant.overlap.SpareCoreProbe): measured while the caller
works, it counts the caller's own CPU time as idle, so it answers what sleeping would answer."""

from __future__ import annotations

import pytest

import monoquant.overlap as ov


def fake_probe(
    monkeypatch: pytest.MonkeyPatch, samples: list[tuple[int, int]], own: list[float], ncpu: int = 2
):
    monkeypatch.setattr(ov, "_cpu_sample", lambda: samples.pop(0))
    monkeypatch.setattr(ov, "_own_jiffies", lambda: own.pop(0))
    monkeypatch.setattr(ov.os, "cpu_count", lambda: ncpu)
    return ov.SpareCoreProbe(window=0.0)


@pytest.mark.parametrize(
    ("idle", "own", "spare"),
    [
        (100, 0, True),  # half of 2 CPUs idle over the window: one core free
        (50, 0, False),  # a quarter idle: not enough
        (50, 30, True),  # a quarter idle while this process itself used 30 jiffies: those count as free
        (0, 0, False),
        (0, 500, True),  # this process alone kept both CPUs busy: nobody else needs them
    ],
)
def test_own_cpu_counts_as_idle(monkeypatch, idle: int, own: float, spare: bool) -> None:
    probe = fake_probe(monkeypatch, [(0, 0), (idle, 200)], [0.0, own])
    assert probe.result() is spare
    assert probe.result() is spare  # kept: no second measurement (the fakes would raise IndexError)


def test_one_cpu_never_has_a_spare_core(monkeypatch) -> None:
    assert fake_probe(monkeypatch, [(0, 0), (200, 200)], [0.0, 0.0], ncpu=1).result() is False


def test_unreadable_proc_stat_means_no(monkeypatch) -> None:
    def boom() -> tuple[int, int]:
        raise OSError("no /proc")

    monkeypatch.setattr(ov, "_cpu_sample", boom)
    assert ov.SpareCoreProbe(window=0.0).result() is False


def test_real_probe_answers() -> None:
    assert isinstance(ov.spare_core(window=0.01), bool)
