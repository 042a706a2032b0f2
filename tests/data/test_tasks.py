"""Tasks as data: targets per task, prompts per language pair, mixtures by weight."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from conftest import make_tiny_parts, tiny_batch, write_translation_shards

from mmalign.data.features import WhisperFeatures
from mmalign.data.pipeline import build_pipeline
from mmalign.data.shardset import resolve_shards
from mmalign.data.stages import MixSource
from mmalign.data.tasks import TaskError, apply_task, prompt_key, prompt_value, target_text
from mmalign.llm.prompt import IGNORE_INDEX
from mmalign.model import SpeechLLM
from mmalign.projectors.mlp import MLPProjector

META = {
    "text": "open the file",
    "translation": {"de": "Datei öffnen", "fr": "ouvrir le fichier"},
    "source_lang": "en",
}


def test_targets_follow_the_task():
    assert target_text(META, "asr") == "open the file"
    assert target_text({**META, "target_lang": "fr"}, "st") == "ouvrir le fichier"
    with pytest.raises(TaskError, match="target_lang"):
        target_text(META, "st")  # two translations, none chosen
    with pytest.raises(TaskError, match="translation into es"):
        target_text({**META, "target_lang": "es"}, "st")
    assert target_text({"text": "x", "translation": {"de": "y"}}, "st") == "y"  # only one
    sample = {"text": "open the file", "task": "asr", "meta": META}
    st = apply_task(sample, "st", "de")
    assert (st["task"], st["text"], st["transcript"]) == ("st", "Datei öffnen", "open the file")
    assert apply_task(st, "asr")["text"] == "open the file"  # back again: nothing lost
    assert sample["task"] == "asr" and "target_lang" not in sample["meta"]


def test_prompts_per_task_and_language_pair():
    prompts = {
        "st": "Translate into {target_lang}: {modality}",
        "st:en-fr": "En français: {modality}",
    }
    meta_de, meta_fr = {**META, "target_lang": "de"}, {**META, "target_lang": "fr"}
    assert prompt_key(prompts, "st", meta_de) == "st"
    assert prompt_key(prompts, "st", meta_fr) == "st:en-fr"
    assert prompt_value("target_lang", meta_de) == "German"
    assert prompt_value("source_lang", meta_de) == "English"


def test_model_prompt_and_labels_per_task(tokenizer_dir):
    encoder, llm = make_tiny_parts(tokenizer_dir)
    proj = MLPProjector(encoder.dim, llm.hidden_size, rate=2, hidden_dim=8)
    model = SpeechLLM(encoder, proj, llm, prompts={"st:en-fr": "French please: {modality}"})
    b = tiny_batch(3)
    b["task"] = ["asr", "st", "st"]
    b["meta"] = [META, {**META, "target_lang": "de"}, {**META, "target_lang": "fr"}]
    b["texts"] = ["open the file", "Datei öffnen", "ouvrir le fichier"]
    heads, _ = model._segments(b)
    decoded = [model.tokenizer.decode(h) for h in heads]
    assert "Transcribe" in decoded[0] and "German" in decoded[1] and "French please" in decoded[2]
    s = model.splice_batch(b, train=True)
    for row, text in enumerate(b["texts"]):
        labels = s.labels[row][s.labels[row] != IGNORE_INDEX].tolist()
        assert labels == model.prompt.target(text)  # the target of each sample's own task


def test_mixture_follows_weights_and_tasks(tmp_path):
    shards = write_translation_shards(tmp_path, 20)
    urls = resolve_shards(shards).urls
    mix = [
        (MixSource(str(shards), weight=3.0, task="asr"), urls),
        (MixSource(str(shards), weight=1.0, task="st", target_lang="de"), urls),
    ]
    pipe = build_pipeline(
        urls, features=WhisperFeatures(), train=True, mix=mix, seed=1,
        max_batch_size=8, max_batch_seconds=100.0, bucket_buffer=16, batches_per_worker=250,
    )  # fmt: skip
    tasks: Counter[str] = Counter()
    for batch in pipe:
        tasks.update(batch["task"])
        for task, text, meta in zip(batch["task"], batch["texts"], batch["meta"], strict=True):
            assert text == (meta["text"] if task == "asr" else meta["translation"]["de"])
    total = sum(tasks.values())
    assert total == 2000
    assert abs(tasks["st"] / total - 0.25) < 0.03, tasks
    assert pipe.counter.totals_by_reason().get("missing translation", 0) > 0  # 1 in 5 st draws
    again = build_pipeline(
        urls, features=WhisperFeatures(), train=True, mix=mix, seed=1,
        max_batch_size=8, max_batch_seconds=100.0, bucket_buffer=16, batches_per_worker=5,
    )  # fmt: skip
    first = [b["keys"] for b in again]
    again2 = build_pipeline(
        urls, features=WhisperFeatures(), train=True, mix=mix, seed=1,
        max_batch_size=8, max_batch_seconds=100.0, bucket_buffer=16, batches_per_worker=5,
    )  # fmt: skip
    assert first == [b["keys"] for b in again2]  # seeded: same draws, same order


def test_eval_mixture_reads_each_source_once(tmp_path):
    shards = write_translation_shards(tmp_path, 10)
    urls = resolve_shards(shards).urls
    mix = [
        (MixSource(str(shards), task="asr"), urls),
        (MixSource(str(shards), task="st", target_lang="fr"), urls),
    ]
    pipe = build_pipeline(urls, features=WhisperFeatures(), train=False, mix=mix)
    tasks = Counter(t for b in pipe for t in b["task"])
    assert tasks == {"asr": 10, "st": 8}
    with pytest.raises(ValueError, match="weight"):
        MixSource(str(shards), weight=0)


def test_datamodule_takes_a_list_of_sources(tmp_path):
    from mmalign.data.datamodule import ShardDataModule

    shards = write_translation_shards(tmp_path, 10)
    dm = ShardDataModule(
        train=[{"shards": str(shards), "task": "asr"}, {"shards": str(shards), "task": "st",
               "target_lang": "de", "weight": 2.0}],
        val=[{"shards": str(shards), "task": "st", "target_lang": "fr"}],
    )  # fmt: skip
    assert dm.num_samples("train") == 20
    batch = next(iter(dm.val_dataloader()))
    assert set(batch["task"]) == {"st"} and batch["texts"][0].startswith("mot")
    with pytest.raises(FileNotFoundError, match=r"train\[1\].shards"):
        ShardDataModule(train=[{"shards": str(shards)}, {"shards": str(tmp_path / "nope")}])
    assert torch.is_tensor(batch["audio_features"])
