"""Shard pipeline and data module: corrupt samples, batching, splitting, epochs, Lightning."""

from __future__ import annotations

import json
import random
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import soundfile as sf
import torch
import webdataset as wds

from mmalign.data.batching import DurationBatcher, estimate_num_batches, pack_sorted
from mmalign.data.datamodule import ShardDataModule
from mmalign.data.encoding import encode_flac
from mmalign.data.shards import prepare


def make_corpus(root: Path, n: int, shard_max_count: int, seed: int = 0) -> Path:
    """``n`` sine clips of 0.2-1.2 s prepared into shards; returns the shard folder."""
    rng = random.Random(seed)
    lines = []
    for i in range(n):
        seconds = round(rng.uniform(0.2, 1.2), 2)
        t = np.arange(int(seconds * 16000)) / 16000
        sf.write(root / f"u{i}.wav", (0.2 * np.sin(2 * np.pi * 200 * t)).astype(np.float32), 16000)
        lines.append(json.dumps({"audio": f"u{i}.wav", "text": f"utterance {i}", "key": f"u{i}"}))
    (root / "m.jsonl").write_text("\n".join(lines) + "\n")
    out = root / "shards"
    report = prepare(root / "m.jsonl", out, shard_max_count=shard_max_count, progress=False)
    assert report.written == n
    return out


def write_corrupt_shard(path: Path) -> tuple[set[str], int]:
    """A shard with 4 good samples and 4 bad ones; returns (good keys, number of bad)."""
    t = np.arange(4000) / 16000
    flac = encode_flac(
        torch.from_numpy((0.2 * np.sin(2 * np.pi * 300 * t)).astype(np.float32)), 16000
    )
    good = {f"good{i}" for i in range(4)}
    with wds.TarWriter(str(path)) as sink:
        for i, key in enumerate(sorted(good)):
            meta = {"text": f"good {i}", "task": "asr" if i % 2 else "translate"}
            sink.write({"__key__": key, "flac": flac, "json": json.dumps(meta).encode()})
            bad = [
                {"flac": b"\x00garbage" * 50, "json": b'{"text": "x"}'},  # undecodable audio
                {"flac": flac, "json": b"{not json"},
                {"flac": flac},  # no json
                {"flac": flac, "json": b'{"text": ""}'},  # no text
            ][i]
            sink.write({"__key__": f"bad{i}", **bad})
    return good, 4


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """18 clips in 5 shards of at most 4."""
    return make_corpus(tmp_path_factory.mktemp("corpus"), 18, shard_max_count=4)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_corrupt_samples_are_skipped_and_counted(tmp_path, num_workers, caplog) -> None:
    good, n_bad = write_corrupt_shard(tmp_path / "bad-000000.tar")
    dm = ShardDataModule(val=str(tmp_path / "bad-*.tar"), num_workers=num_workers)
    dm.setup("validate")
    with caplog.at_level("WARNING"):
        batches = list(dm.val_dataloader())
    assert {k for b in batches for k in b["keys"]} == good
    assert dm.skipped == {"val": n_bad}
    assert sum(b["skipped"] for b in batches) <= n_bad  # deltas; a worker may yield no batch
    if num_workers == 0:  # worker logs go to the worker processes' stderr
        assert "bad-000000.tar" in caplog.text and "bad0" in caplog.text
        assert dm.pipeline("val").counter.total == n_bad
    tasks = {k: t for b in batches for k, t in zip(b["keys"], b["task"], strict=True)}
    assert tasks["good0"] == "translate" and tasks["good1"] == "asr"
    list(dm.val_dataloader())  # a second epoch adds to the tally
    assert dm.skipped["val"] == 2 * n_bad


def test_pack_sorted_respects_budget_and_size() -> None:
    rng = random.Random(0)
    samples = sorted(
        ({"duration": rng.uniform(0.5, 9.0)} for _ in range(200)), key=lambda s: s["duration"]
    )
    samples.append({"duration": 25.0})  # longer than the budget: a batch of its own
    batches = pack_sorted(samples, max_batch_seconds=20.0, max_batch_size=8)
    assert sum(len(b) for b in batches) == len(samples)
    for batch in batches[:-1]:
        assert max(s["duration"] for s in batch) * len(batch) <= 20.0
        assert len(batch) <= 8
    assert batches[-1] == [{"duration": 25.0}]


def test_duration_batcher_buckets_and_shuffles() -> None:
    rng = random.Random(1)
    samples = [{"id": i, "duration": rng.uniform(0.5, 15.0)} for i in range(300)]

    def run(**kwargs) -> list[list[dict]]:
        return list(DurationBatcher(30.0, buffer_size=100, **kwargs)(iter(samples)))

    ordered = run()
    assert sorted(s["id"] for b in ordered for s in b) == list(range(300))
    for batch in ordered:
        assert len(batch) == 1 or max(s["duration"] for s in batch) * len(batch) <= 30.0
    # eval: within each buffer of 100 the batches come out sorted by duration
    flat = [s for b in ordered for s in b]
    for start in range(0, 300, 100):
        durations = [s["duration"] for s in flat[start : start + 100]]
        assert durations == sorted(durations)
        assert {s["id"] for s in flat[start : start + 100]} == set(range(start, start + 100))
    assert run() == ordered  # deterministic

    shuffled = run(shuffle=True, seed=5)
    assert shuffled != ordered
    assert sorted(s["id"] for b in shuffled for s in b) == list(range(300))
    assert run(shuffle=True, seed=5) == shuffled
    assert run(shuffle=True, seed=6) != shuffled
    # bucketing inside each batch is unchanged by the shuffle
    assert sorted(tuple(s["id"] for s in b) for b in shuffled) == sorted(
        tuple(s["id"] for s in b) for b in ordered
    )


def test_estimate_num_batches() -> None:
    assert estimate_num_batches(0, 0.0, 60.0) == 0
    assert estimate_num_batches(100, None, 60.0, max_batch_size=8) == 13
    assert estimate_num_batches(100, 1000.0, 60.0) >= 1000 / 60
    assert estimate_num_batches(100, 1000.0, 60.0, max_batch_size=2) == 50


@pytest.mark.parametrize(("shard_max_count", "num_workers"), [(4, 0), (4, 2), (100, 2)])
def test_eval_epoch_yields_every_sample_once(tmp_path, shard_max_count, num_workers) -> None:
    # (100, 2): one shard for two workers, so the split happens per sample
    shards = make_corpus(tmp_path, 18, shard_max_count)
    dm = ShardDataModule(
        val=str(shards), test=str(shards), max_batch_seconds=3.0, num_workers=num_workers
    )
    expected = sorted(f"u{i}" for i in range(18))
    epochs = []
    for _ in range(2):
        keys = [k for b in dm.val_dataloader() for k in b["keys"]]
        assert sorted(keys) == expected
        epochs.append(keys)
    assert epochs[0] == epochs[1]  # no shuffling outside training
    assert sorted(k for b in dm.test_dataloader() for k in b["keys"]) == expected


def test_batch_schema(corpus) -> None:
    dm = ShardDataModule(
        val=str(corpus), max_batch_seconds=4.0, max_batch_size=3, keep_waveform=True
    )
    for batch in dm.val_dataloader():
        B = len(batch["keys"])
        assert 1 <= B <= 3
        feats, lengths = batch["audio_features"], batch["audio_lengths"]
        assert (
            feats.dtype == torch.float32 and feats.shape[:2] == (B, 80) and feats.shape[2] % 2 == 0
        )
        assert lengths.dtype == torch.long and int(lengths.max()) <= feats.shape[2]
        assert batch["audio"].shape == (B, int(batch["audio_sample_lengths"].max()))
        assert torch.equal(lengths, (batch["audio_sample_lengths"] + 159) // 160)
        assert batch["durations"].shape == (B,) and float(batch["durations"].max()) * B <= 4.0
        assert batch["texts"] == [m["text"] for m in batch["meta"]]
        assert batch["task"] == ["asr"] * B and batch["skipped"] == 0


@pytest.mark.parametrize("num_workers", [0, 2])
def test_train_epochs_sized_from_index_and_reshuffled(corpus, num_workers) -> None:
    def keys_per_epoch(seed: int, epochs: int = 2) -> list[list[str]]:
        dm = ShardDataModule(
            train=str(corpus), max_batch_seconds=3.0, num_workers=num_workers, seed=seed,
            shuffle_buffer=8, bucket_buffer=8,
        )  # fmt: skip
        dm.setup("fit")
        assert dm.num_samples("train") == 18
        loader = dm.train_dataloader()
        out = []
        for _ in range(epochs):
            batches = list(loader)
            assert len(batches) == dm.train_batches_per_worker() * max(1, num_workers)
            out.append([k for b in batches for k in b["keys"]])
        return out

    first = keys_per_epoch(seed=0)
    assert first[0] != first[1]  # a new shuffle every epoch
    assert keys_per_epoch(seed=0) == first  # ... reproducible from the seed
    assert keys_per_epoch(seed=1, epochs=1)[0] != first[0]
    assert len(set(first[0])) >= 12  # one epoch covers most of the corpus


def test_epoch_size_and_world_size(corpus) -> None:
    dm = ShardDataModule(train=str(corpus), max_batch_seconds=3.0, max_batch_size=2, epoch_size=40)
    assert dm.train_batches_per_worker(world_size=1) == 20
    assert dm.train_batches_per_worker(world_size=2) == 10
    dm.load_state_dict({"train_epoch": 3})
    assert dm.state_dict() == {"train_epoch": 3}
    list(dm.train_dataloader())
    assert dm.state_dict() == {"train_epoch": 4}


def test_shard_specs_and_errors(corpus, tmp_path) -> None:
    by_index = ShardDataModule(train=str(corpus / "index.json"))
    by_glob = ShardDataModule(train=str(corpus / "shard-*.tar"))
    by_brace = ShardDataModule(train=str(corpus / "shard-{000000..000004}.tar"))
    for dm in (by_index, by_glob, by_brace):
        assert len(dm.shard_sets["train"].urls) == 5 and dm.num_samples("train") == 18
    assert by_index.num_seconds("train") == pytest.approx(
        json.loads((corpus / "index.json").read_text())["total_seconds"]
    )
    with pytest.raises(FileNotFoundError, match="does-not-exist"):
        ShardDataModule(val=str(tmp_path / "does-not-exist"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty"):
        ShardDataModule(test=str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match="nothing-"):
        ShardDataModule(train=str(tmp_path / "nothing-*.tar"))
    with pytest.raises(ValueError, match="needs train"):
        ShardDataModule(val=str(corpus)).setup("fit")
    with pytest.raises(ValueError, match="no test shards"):
        ShardDataModule(val=str(corpus)).num_samples("test")


class _TinyModel(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(80, 1)
        self.val_keys: list[str] = []

    def training_step(self, batch, batch_idx):
        self.log("data/skipped", float(batch["skipped"]), reduce_fx="sum", batch_size=1)
        return self.proj(batch["audio_features"].mean(-1)).pow(2).mean()

    def validation_step(self, batch, batch_idx):
        self.val_keys += batch["keys"]

    def predict_step(self, batch, batch_idx):
        return batch["keys"]

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def test_lightning_fit_and_predict(corpus, tmp_path) -> None:
    good, n_bad = write_corrupt_shard(tmp_path / "bad.tar")
    dm = ShardDataModule(
        train=str(corpus), val=str(tmp_path / "bad.tar"), predict=str(corpus), max_batch_seconds=3.0
    )
    model = _TinyModel()
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_epochs=2, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
    )  # fmt: skip
    trainer.fit(model, datamodule=dm)
    assert trainer.global_step == 2 * dm.train_batches_per_worker()
    assert set(model.val_keys) == good and len(model.val_keys) == 2 * len(good)
    assert dm.skipped["val"] == 2 * n_bad
    predictions = trainer.predict(model, datamodule=dm)
    assert sorted(k for keys in predictions for k in keys) == sorted(f"u{i}" for i in range(18))
