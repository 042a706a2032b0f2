"""Torch threads beside DataLoader workers on CPU."""

from __future__ import annotations

import torch


def test_cpu_threads_leave_a_core_to_each_worker(monkeypatch):
    from mmalign.data import threads as datamodule

    before = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("MMALIGN_KEEP_THREADS", raising=False)
    monkeypatch.setattr(datamodule.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    try:
        torch.set_num_threads(4)
        assert datamodule.cap_cpu_threads(0) == 4  # no workers: nothing to leave
        assert datamodule.cap_cpu_threads(1) == 3 and torch.get_num_threads() == 3
        torch.set_num_threads(4)
        assert datamodule.cap_cpu_threads(8) == 1  # at least one thread
        torch.set_num_threads(4)
        monkeypatch.setenv("OMP_NUM_THREADS", "4")  # the user's choice wins
        assert datamodule.cap_cpu_threads(2) == 4 and torch.get_num_threads() == 4
    finally:
        torch.set_num_threads(before)
