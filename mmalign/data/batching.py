"""Duration-based batching with length bucketing, as a streaming webdataset stage.

Speech batches cost what their *padded* length costs: ``max duration x batch size``. So, as in
lhotse's samplers, duration rather than a sample count decides what goes into a batch. The
batcher reads ``buffer_size`` samples, sorts them by duration (so similar lengths share a batch
and little padding is wasted), and cuts the sorted run greedily into batches whose padded
duration stays within ``max_batch_seconds`` (and whose size stays within ``max_batch_size``).
A single sample longer than ``max_batch_seconds`` becomes a batch of one rather than being
dropped. For training the batches of each buffer are emitted in a seeded random order; for
evaluation they come out in sorted order, so a run is reproducible.

*Bucketing by LLM length too.* The LLM reads ``prompt + audio embeddings + target`` tokens, so
a batch also costs its padded LLM length, longest x count. ``max_batch_tokens`` adds that second
budget, on an estimate of each sample's LLM length (:class:`LLMLength`: seconds x embeddings per
second after projection, plus prompt tokens, plus target characters / characters per token).
With it the buffer is sorted by the sum of each sample's shares of the two budgets
(``duration / max_batch_seconds + tokens / max_batch_tokens``), so neighbours are close in both,
and a batch is cut when either padded cost would pass its budget. Without it (the default)
nothing changes. :func:`padding_efficiency` measures valid / padded audio and LLM length.

The stage runs inside the webdataset pipeline, i.e. in the DataLoader workers.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

Sample = dict[str, Any]


def _duration(sample: Sample) -> float:
    return float(sample["duration"])


@dataclass(frozen=True)
class LLMLength:
    """Estimated LLM sequence length of a sample: ``prompt_tokens + tokens_per_second x
    duration + len(text) / chars_per_token`` (the EOS counted as one token).

    ``tokens_per_second`` is the modality embeddings the LLM reads per second of audio: the
    encoder frame rate over the compression rate (Whisper's 50 frames/s at rate 5: 10). The
    default 0 leaves out the audio span, so the estimate is the target text's tokens.
    """

    tokens_per_second: float = 0.0
    chars_per_token: float = 4.0
    prompt_tokens: int = 0

    def __post_init__(self) -> None:
        if self.tokens_per_second < 0 or self.chars_per_token <= 0 or self.prompt_tokens < 0:
            raise ValueError(
                f"{self}: tokens_per_second >= 0, chars_per_token > 0, prompt_tokens >= 0"
            )

    def __call__(self, sample: Sample) -> float:
        text = sample.get("text") or ""
        return (
            self.prompt_tokens
            + self.tokens_per_second * _duration(sample)
            + math.ceil(len(text) / self.chars_per_token)
            + 1
        )


def pack_sorted(
    samples: list[Sample],
    max_batch_seconds: float,
    max_batch_size: int | None = None,
    duration: Callable[[Sample], float] = _duration,
    max_batch_tokens: float | None = None,
    tokens: Callable[[Sample], float] | None = None,
) -> list[list[Sample]]:
    """Cut sorted ``samples`` greedily into batches whose padded duration, longest x count, is
    at most ``max_batch_seconds`` and, with ``max_batch_tokens``, whose padded LLM length
    (``tokens``, default :class:`LLMLength`, longest x count) is at most that."""
    if max_batch_tokens is not None and tokens is None:
        tokens = LLMLength()
    batches: list[list[Sample]] = []
    current: list[Sample] = []
    longest = longest_tokens = 0.0
    for sample in samples:
        d = duration(sample)
        t = tokens(sample) if max_batch_tokens is not None and tokens is not None else 0.0
        new_longest, new_tokens = max(longest, d), max(longest_tokens, t)
        full = max_batch_size is not None and len(current) >= max_batch_size
        over = new_longest * (len(current) + 1) > max_batch_seconds
        if max_batch_tokens is not None:
            over = over or new_tokens * (len(current) + 1) > max_batch_tokens
        if current and (full or over):
            batches.append(current)
            current, new_longest, new_tokens = [], d, t
        current.append(sample)
        longest, longest_tokens = new_longest, new_tokens
    if current:
        batches.append(current)
    return batches


def padding_efficiency(
    batches: Iterable[Sequence[Sample]],
    tokens: Callable[[Sample], float] | None = None,
    duration: Callable[[Sample], float] = _duration,
) -> dict[str, float]:
    """Valid / padded share of batches of samples: ``audio`` (seconds; frames are proportional)
    and ``llm`` (estimated LLM tokens, :class:`LLMLength` by default), each summed over all
    batches: sum of lengths / sum of longest x count."""
    tokens = tokens or LLMLength()
    valid = {"audio": 0.0, "llm": 0.0}
    total = {"audio": 0.0, "llm": 0.0}
    for batch in batches:
        for name, length in (("audio", duration), ("llm", tokens)):
            sizes = [float(length(s)) for s in batch]
            if sizes:
                valid[name] += sum(sizes)
                total[name] += max(sizes) * len(sizes)
    return {k: valid[k] / total[k] if total[k] > 0 else 1.0 for k in valid}


class DurationBatcher:
    """Streaming bucketing batcher: iterator of samples in, iterator of sample lists out.

    Use it as a stage of a ``wds.DataPipeline`` (a callable stage: this module imports no
    webdataset, so the GPU benchmark can use it) or call it on any iterator. ``shuffle`` permutes
    the batches of each buffer with a generator seeded by ``seed``, the epoch and the number of
    runs so far, plus whatever ``seed_parts`` returns (the data pipeline passes rank and worker),
    so every epoch differs and a rerun repeats exactly.

    ``max_batch_tokens`` adds a budget on the padded LLM length (``tokens``, default
    :class:`LLMLength`) and sorts by both costs (see the module notes).
    """

    def __init__(
        self,
        max_batch_seconds: float,
        max_batch_size: int | None = None,
        buffer_size: int = 200,
        shuffle: bool = False,
        seed: int = 0,
        duration: Callable[[Sample], float] = _duration,
        seed_parts: Callable[[], tuple[int, ...]] | None = None,
        max_batch_tokens: float | None = None,
        tokens: Callable[[Sample], float] | None = None,
    ) -> None:
        if max_batch_seconds <= 0:
            raise ValueError(f"max_batch_seconds must be positive, got {max_batch_seconds}")
        if max_batch_tokens is not None and max_batch_tokens <= 0:
            raise ValueError(f"max_batch_tokens must be positive, got {max_batch_tokens}")
        self.max_batch_tokens = None if max_batch_tokens is None else float(max_batch_tokens)
        self.tokens = tokens or LLMLength()
        if max_batch_size is not None and max_batch_size < 1:
            raise ValueError(f"max_batch_size must be at least 1, got {max_batch_size}")
        self.max_batch_seconds = float(max_batch_seconds)
        self.max_batch_size = max_batch_size
        self.buffer_size = max(1, int(buffer_size))
        self.shuffle = shuffle
        self.seed = seed
        self.duration = duration
        self.seed_parts = seed_parts
        self.runs = 0

    def run(self, src: Iterable[Sample]) -> Iterator[list[Sample]]:
        """Batch one pass over ``src``."""
        parts = self.seed_parts() if self.seed_parts is not None else ()
        rng = random.Random(f"batcher-{self.seed}-{self.runs}-{parts}")
        self.runs += 1
        buffer: list[Sample] = []
        for sample in src:
            buffer.append(sample)
            if len(buffer) >= self.buffer_size:
                yield from self._flush(buffer, rng)
                buffer = []
        if buffer:
            yield from self._flush(buffer, rng)

    __call__ = run

    def sort_key(self, sample: Sample) -> float:
        """Duration; with a token budget, the sum of the sample's shares of both budgets."""
        d = self.duration(sample)
        if self.max_batch_tokens is None:
            return d
        return d / self.max_batch_seconds + self.tokens(sample) / self.max_batch_tokens

    def _flush(self, buffer: list[Sample], rng: random.Random) -> list[list[Sample]]:
        buffer.sort(key=self.sort_key)
        batches = pack_sorted(
            buffer,
            self.max_batch_seconds,
            self.max_batch_size,
            self.duration,
            self.max_batch_tokens,
            self.tokens,
        )
        if self.shuffle:
            rng.shuffle(batches)
        return batches


def estimate_num_batches(
    num_samples: int,
    total_seconds: float | None,
    max_batch_seconds: float,
    max_batch_size: int | None = None,
) -> int:
    """Expected number of batches for ``num_samples`` clips lasting ``total_seconds`` together,
    used to turn an epoch measured in samples into batches. A sorted batch wastes about half a
    clip of padding plus a little spread, so each batch holds ``max_batch_seconds`` minus half a
    mean clip, at 95 %; the size cap gives a second lower bound. An estimate: with clips long
    relative to ``max_batch_seconds`` and a wide spread of durations, fewer samples fit."""
    if num_samples <= 0:
        return 0
    by_count = math.ceil(num_samples / max_batch_size) if max_batch_size else 1
    if not total_seconds or total_seconds <= 0:  # no durations known: assume full size-capped
        return by_count if max_batch_size else num_samples
    mean = total_seconds / num_samples
    usable = max(mean, max_batch_seconds - mean / 2) * 0.95
    by_seconds = math.ceil(total_seconds / usable)
    return max(1, by_count, min(by_seconds, num_samples))
