"""Sampling modes and resumable loader positions (in one process; the kill-and-resume test and
the multi-process DDP test live in tests/lightning_modules/test_scale.py)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from mmalign.data.datamodule import ShardDataModule
from mmalign.data.loading import make_loader
from mmalign.data.skips import DataQualityError, SkipCounter
from tests.data.test_pipeline import make_corpus, write_corrupt_shard


@pytest.fixture(scope="module")
def uneven(tmp_path_factory) -> Path:
    """23 clips in 6 shards of at most 4 (the last holds 3)."""
    return make_corpus(tmp_path_factory.mktemp("uneven"), 23, shard_max_count=4, seed=3)


def _dm(shards: Path, **kw: Any) -> ShardDataModule:
    settings = dict(
        train=str(shards), max_batch_seconds=2.0, bucket_buffer=8, shuffle_buffer=8, seed=5
    )
    return ShardDataModule(**{**settings, **kw})


def _epoch(dm: ShardDataModule) -> list[dict[str, Any]]:
    return [
        {"keys": b["keys"], "position": b["position"]}
        for b in dm.train_dataloader()  # each iter() is one epoch
    ]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_exact_mode_reads_every_sample_once_per_epoch(uneven, num_workers) -> None:
    dm = _dm(uneven, sampling="exact", num_workers=num_workers)
    loader = dm.train_dataloader()
    first = [k for b in loader for k in b["keys"]]
    second = [k for b in loader for k in b["keys"]]
    assert Counter(first) == Counter(second) == Counter(f"u{i}" for i in range(23))
    assert first != second  # reshuffled per epoch
    again = _dm(uneven, sampling="exact", num_workers=num_workers).train_dataloader()
    assert [k for b in again for k in b["keys"]] == first  # a function of the seed alone


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("sampling", ["exact", "resampled"])
def test_saved_position_resumes_same_batches_in_same_order(uneven, num_workers, sampling) -> None:
    full = _dm(uneven, sampling=sampling, num_workers=num_workers)
    loader = full.train_dataloader()
    epochs = [_epoch_of(loader), _epoch_of(loader)]
    assert len(epochs[1]) >= 4
    for epoch, cut in [(0, 1), (1, 3), (1, len(epochs[1]) - 1)]:
        position = epochs[epoch][cut - 1]["position"]
        resumed = _dm(uneven, sampling=sampling, num_workers=num_workers)
        resumed.load_state_dict(
            {"train_epoch": epoch, "position": {"epoch": epoch, "ranks": [position]}}
        )
        rest = _epoch_of(resumed.train_dataloader())
        assert [b["keys"] for b in rest] == [b["keys"] for b in epochs[epoch][cut:]]
    # a position saved after an epoch's last batch: the next epoch starts
    done = _dm(uneven, sampling=sampling, num_workers=num_workers)
    done.load_state_dict({"train_epoch": 1})
    assert [b["keys"] for b in _epoch_of(done.train_dataloader())] == [b["keys"] for b in epochs[1]]


def _epoch_of(loader) -> list[dict[str, Any]]:
    return [{"keys": b["keys"], "position": b["position"]} for b in loader]


def test_state_dict_follows_consumed_batches(uneven) -> None:
    dm = _dm(uneven, sampling="exact")
    assert dm.state_dict() == {"train_epoch": 0}
    loader = dm.train_dataloader()
    it = iter(loader)
    batch = next(it)
    dm._consumed = batch["position"]  # what on_before_batch_transfer records in training
    state = dm.state_dict()
    assert state["train_epoch"] == 0 and state["position"]["ranks"] == [batch["position"]]
    list(it)
    assert dm.state_dict() == {"train_epoch": 1}  # epoch ran to its end


def test_position_from_other_worker_count_restarts_epoch(uneven, caplog) -> None:
    full = _epoch_of(_dm(uneven, sampling="exact", num_workers=0).train_dataloader())
    resumed = _dm(uneven, sampling="exact", num_workers=2)
    resumed.load_state_dict(
        {"train_epoch": 0, "position": {"epoch": 0, "ranks": [full[1]["position"]]}}
    )
    keys = [k for b in resumed.train_dataloader() for k in b["keys"]]
    assert sorted(keys) == sorted(f"u{i}" for i in range(23))
    assert "restarts from its beginning" in caplog.text


def test_position_from_other_rank_count_restarts_epoch(uneven, caplog) -> None:
    """Saved by 2 ranks, resumed on 1: no rank's position fits, so the epoch starts over
    (nothing skipped, nothing read twice) and the log says so."""
    loader = _dm(uneven, sampling="exact").train_dataloader()
    saved = next(iter(loader))["position"]
    resumed = _dm(uneven, sampling="exact")
    resumed.load_state_dict({"train_epoch": 0, "position": {"epoch": 0, "ranks": [saved, saved]}})
    keys = [k for b in resumed.train_dataloader() for k in b["keys"]]
    assert sorted(keys) == sorted(f"u{i}" for i in range(23))
    assert "saved with 2 rank(s)" in caplog.text and "restarts from its beginning" in caplog.text


def test_skip_rate_threshold_stops_with_clear_error(tmp_path) -> None:
    folder = tmp_path / "bad"
    folder.mkdir()
    write_corrupt_shard(folder / "s-000000.tar")  # half the samples are damaged
    dm = ShardDataModule(
        train=str(folder), sampling="exact", max_skip_rate=0.3, skip_rate_min_samples=4
    )
    with pytest.raises(DataQualityError, match=r"train: 4 of 8 .*max_skip_rate=0.3.*bad json: 1"):
        list(dm.train_dataloader())
    ok = ShardDataModule(
        train=str(folder), sampling="exact", max_skip_rate=0.6, skip_rate_min_samples=4
    )
    assert sum(len(b["keys"]) for b in ok.train_dataloader()) == 4
    with pytest.raises(ValueError, match="max_skip_rate"):
        ShardDataModule(train=str(folder), max_skip_rate=2.0)
    with pytest.raises(ValueError, match="sampling"):
        ShardDataModule(train=str(folder), sampling="random")


def test_skips_are_logged_per_reason_each_epoch(tmp_path, caplog) -> None:
    folder = tmp_path / "bad"
    folder.mkdir()
    write_corrupt_shard(folder / "s-000000.tar")
    dm = ShardDataModule(train=str(folder), sampling="exact", max_skip_rate=None)
    loader = dm.train_dataloader()
    lines = []
    for epoch in (0, 1):
        caplog.clear()
        list(loader)
        lines += [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
        assert lines[-1].startswith(f"train epoch {epoch} (rank 0): skipped 4 samples: ")
    assert len(lines) == 2 and "bad json: 1" in lines[0]  # that epoch's own counts, by reason
    assert lines[0].split(": ", 1)[1] == lines[1].split(": ", 1)[1]


def test_filters_do_not_count_as_damage(tmp_path) -> None:
    counter = SkipCounter()
    for _ in range(10):
        counter.saw()
    for _ in range(6):
        counter.skip("audio too long: 31 s", url="u", key="k")
    loader = make_loader(
        _dm(make_corpus(tmp_path, 2, 2)).pipeline("train"), max_skip_rate=0.1, min_samples=5
    )
    loader.check_skip_rate(counter)  # 60 % filtered, 0 % damaged: fine
    counter.skip("bad json: x", url="u", key="k")
    loader.check_skip_rate(counter)  # 10 % damaged: at the threshold, not past it
    counter.skip("missing audio", url="u", key="k2")
    with pytest.raises(DataQualityError, match="2 of 10"):
        loader.check_skip_rate(counter)


def test_mixture_hyperparameters_are_plain_dicts(uneven) -> None:
    from mmalign.data.stages import MixSource

    dm = ShardDataModule(train=[MixSource(str(uneven), weight=2.0)], val=str(uneven))
    assert dm.hparams["train"] == [
        {"shards": str(uneven), "weight": 2.0, "task": None, "target_lang": None}
    ]
