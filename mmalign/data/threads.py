"""Torch's CPU threads beside DataLoader workers: :func:`cap_cpu_threads`."""

from __future__ import annotations

import os

import torch
from lightning.pytorch.utilities import rank_zero_info


def cap_cpu_threads(num_workers: int) -> int:
    """Leave one core to each DataLoader worker when training on CPU; returns torch's threads.

    Why: workers compute log-mel while the step runs, and torch's OpenMP threads on the same
    cores then oversubscribe them (a step several times slower). ``OMP_NUM_THREADS`` or
    ``MMALIGN_KEEP_THREADS=1`` keeps the user's setting.
    """
    threads = torch.get_num_threads()
    if (
        num_workers <= 0
        or os.environ.get("OMP_NUM_THREADS")
        or os.environ.get("MMALIGN_KEEP_THREADS")
    ):
        return threads
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    want = max(1, cores - num_workers)
    if threads > want:
        torch.set_num_threads(want)
        rank_zero_info(
            f"torch threads {threads} -> {want}: {cores} cores, {num_workers} DataLoader "
            "worker(s) computing features (set OMP_NUM_THREADS to choose)"
        )
        return want
    return threads
