"""Bucketing by LLM length as well as duration, and padding efficiency."""

from __future__ import annotations

import math
import random

import pytest

from mmalign.data.batching import DurationBatcher, LLMLength, pack_sorted, padding_efficiency
from mmalign.data.datamodule import ShardDataModule

LENGTH = LLMLength(tokens_per_second=10.0, chars_per_token=4.0, prompt_tokens=20)


def translation_like(n: int = 1000, seed: int = 0) -> list[dict]:
    """Clips of 1-15 s whose target text is only loosely tied to the duration."""
    rng = random.Random(seed)
    samples = []
    for i in range(n):
        d = rng.uniform(1.0, 15.0)
        samples.append({"id": i, "duration": d, "text": "x" * int(rng.uniform(0.2, 2.0) * d * 12)})
    return samples


def test_llm_length_estimate() -> None:
    sample = {"duration": 2.0, "text": "abcdefghi"}  # 9 characters: 3 tokens at 4 a token
    assert LENGTH(sample) == 20 + 20 + 3 + 1
    assert LLMLength()(sample) == 3 + 1  # default: target tokens + EOS only
    with pytest.raises(ValueError, match="chars_per_token"):
        LLMLength(chars_per_token=0)


def test_padding_efficiency() -> None:
    batches = [
        [{"duration": 1.0, "text": "ab"}, {"duration": 3.0, "text": "abcdef"}],
        [{"duration": 2.0, "text": "abcd"}],
    ]
    eff = padding_efficiency(batches, LLMLength(chars_per_token=2.0))
    assert eff["audio"] == pytest.approx((1 + 3 + 2) / (3 * 2 + 2))
    assert eff["llm"] == pytest.approx((2 + 4 + 3) / (4 * 2 + 3))  # ceil(chars / 2) + EOS


def test_pack_sorted_token_budget() -> None:
    samples = sorted(translation_like(300), key=lambda s: s["duration"])
    plain = pack_sorted(samples, 60.0)
    assert pack_sorted(samples, 60.0, max_batch_tokens=None, tokens=LENGTH) == plain
    both = pack_sorted(samples, 60.0, max_batch_tokens=1000, tokens=LENGTH)
    assert sum(len(b) for b in both) == len(samples)
    assert len(both) > len(plain)  # the token budget binds here
    for batch in both:
        if len(batch) > 1:
            assert max(s["duration"] for s in batch) * len(batch) <= 60.0
            assert max(LENGTH(s) for s in batch) * len(batch) <= 1000


def test_bucketing_by_both_costs_pads_the_llm_less() -> None:
    samples = translation_like()

    def run(**kwargs) -> list[list[dict]]:
        return list(DurationBatcher(60.0, buffer_size=200, tokens=LENGTH, **kwargs)(samples))

    by_duration, by_both = run(), run(max_batch_tokens=1200)
    assert sorted(s["id"] for b in by_both for s in b) == list(range(len(samples)))
    before, after = padding_efficiency(by_duration, LENGTH), padding_efficiency(by_both, LENGTH)
    assert after["llm"] > before["llm"] + 0.02
    assert after["audio"] > 0.9  # durations stay well bucketed
    assert len(by_both) < 1.1 * len(by_duration)  # not by making batches much smaller
    for batch in by_both:
        assert len(batch) == 1 or max(LENGTH(s) for s in batch) * len(batch) <= 1200


def test_datamodule_token_budget(tone_shards) -> None:
    budget, per_second = 40, 12.5
    dm = ShardDataModule(
        val=str(tone_shards),
        max_batch_seconds=60.0,
        max_batch_tokens=budget,
        llm_tokens_per_second=per_second,
        llm_prompt_tokens=5,
        chars_per_token=3.0,
    )
    batches = list(dm.val_dataloader())
    assert sum(len(b["texts"]) for b in batches) == 12
    for b in batches:
        lengths = [
            5 + per_second * float(d) + math.ceil(len(t) / 3.0) + 1
            for d, t in zip(b["durations"], b["texts"], strict=True)
        ]
        assert len(lengths) == 1 or max(lengths) * len(lengths) <= budget
    assert len(batches) > len(list(ShardDataModule(val=str(tone_shards)).val_dataloader()))
    with pytest.raises(ValueError, match="max_batch_tokens"):
        ShardDataModule(val=str(tone_shards), max_batch_tokens=0)
