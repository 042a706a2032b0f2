"""Seeded fuzz test of dirty shards (issue 8, "Dirty data"): one epoch over shards full of damaged
samples finishes, uses every good sample exactly once, and counts every bad one under its reason.

The corpus (built once per module): ``N_SHARDS`` tar shards of ``PER_SHARD`` samples, written
member by member with ``tarfile`` (``<key>.flac`` + ``<key>.json`` as ``mmalign prepare`` writes
them) so that every byte is known, plus one file in the shard list that is not a tar at all. A
seeded ``random.Random`` mutates ``N_BAD`` of the samples, each with one kind of damage from
``BAD_KINDS`` (bad or non-object JSON, missing or ill-typed text, missing members, garbage,
truncated or frame-less audio, over-long audio or text); the good samples vary in rate, channels,
container, member order and naming within what the library must accept. The ground truth maps
every key to its kind and the reason the library should give (the text before the first colon
of its ``SampleError``), or ``good``.

Shard-level damage loses an unknown number of samples in general, so it is placed to make the
outcome exact: in each damaged shard only the *last* sample is hit (a plain good sample
otherwise), by truncating the file inside its first member's data, inside its first header or
right before that header, or by overwriting that header with garbage. Exactly that sample is lost.

Damage inside a tar ends its shard with exactly one ``unreadable shard data`` for the lost sample
(the pipeline reads tars strictly: ``tarfile`` alone would end a shard silently at a bad header).
The non-tar file adds one ``unreadable shard data`` (it holds no sample).
"""

from __future__ import annotations

import io
import json
import random
import tarfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from mmalign.data.datamodule import ShardDataModule

SEED = 8
N_SHARDS = 8
PER_SHARD = 90
N_BAD = 560
NON_TAR_INDEX = 5  # position of the non-tar file among the shard file names
MAX_AUDIO_SECONDS = 1.0
MAX_TEXT_CHARS = 64
RATE = 16000
GOOD = "good"
UNREADABLE = "unreadable shard data"
NOT_A_TAR = b"this file is not a tar archive, whatever its name says\n" * 20

# Shard damage, each hitting the last sample of one shard: kind -> shard index.
TAR_DAMAGE = {
    "tar truncated in member data": 1,
    "tar truncated in member header": 3,
    "tar truncated at member boundary": 4,
    "tar member header garbage": 6,
}

# ------------------------------------------------------------------------------ reading


def read_epoch(folder: Path, num_workers: int) -> tuple[list[str], dict[str, int], int]:
    """One training epoch in ``exact`` mode over the shards in ``folder``: (keys of every batch
    in order, skips per reason, skips in total)."""
    dm = ShardDataModule(
        train=str(folder),
        sampling="exact",
        num_workers=num_workers,
        max_batch_seconds=16.0,
        max_audio_seconds=MAX_AUDIO_SECONDS,
        max_text_chars=MAX_TEXT_CHARS,
        max_skip_rate=None,  # most of this corpus is damaged on purpose
    )
    dm.setup("fit")
    keys = [key for batch in dm.train_dataloader() for key in batch["keys"]]
    return keys, dm.skipped_by_reason["train"], dm.skipped["train"]


# ------------------------------------------------------------------------------ audio, JSON

Members = list[tuple[str, bytes]]  # (extension, bytes) in tar order


def wave(rng: random.Random, seconds: float, rate: int = RATE, channels: int = 1) -> np.ndarray:
    """A noisy tone, ``[frames, channels]`` float32."""
    n = max(1, round(seconds * rate))
    t = np.arange(n) / rate
    tone = rng.uniform(0.05, 0.4) * np.sin(2 * np.pi * rng.uniform(80, 2000) * t + rng.random())
    noise = np.random.default_rng(rng.randrange(2**32)).standard_normal((n, channels))
    return np.clip(tone[:, None] + rng.uniform(0.0, 0.1) * noise, -1, 1).astype(np.float32)


def encode(data: np.ndarray, rate: int = RATE, fmt: str = "FLAC") -> bytes:
    buf = io.BytesIO()
    sf.write(buf, data, rate, format=fmt, subtype="PCM_16")
    return buf.getvalue()


def flac_metadata_end(data: bytes) -> int:
    """Byte offset of a FLAC stream's first audio frame (the end of its metadata blocks)."""
    assert data[:4] == b"fLaC"
    pos = 4
    while True:
        last = data[pos] & 0x80
        pos += 4 + int.from_bytes(data[pos + 1 : pos + 4], "big")
        if last:
            return pos


def flac_without_frames(data: bytes) -> bytes:
    """``data``'s metadata with STREAMINFO's sample count set to 0 and no frames: a valid empty
    FLAC, as ffmpeg or the reference encoder write it for empty input."""
    head = bytearray(data[: flac_metadata_end(data)])
    fields = int.from_bytes(head[18:26], "big") & ~((1 << 36) - 1)  # rate|channels|bits|samples
    head[18:26] = fields.to_bytes(8, "big")
    head[26:42] = bytes.fromhex("d41d8cd98f00b204e9800998ecf8427e")  # MD5 of no samples
    return bytes(head)


WORDS = "zero one two three four five six seven eight nine oh".split()


def words(rng: random.Random, n: int = 0) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n or rng.randint(1, 4)))


def dumps(meta: object) -> bytes:
    return json.dumps(meta).encode()


def plain_sample(rng: random.Random) -> Members:
    """What ``prepare`` writes: 16 kHz mono FLAC of 0.05-0.3 s and a JSON with a short text."""
    return [
        ("flac", encode(wave(rng, rng.uniform(0.05, 0.3)))),
        ("json", dumps({"text": words(rng)})),
    ]


GOOD_VARIANTS = (
    "plain",
    "other rate",
    "stereo",
    "wav",
    "json first",
    "upper-case extensions",
    "extra member",
    "rich json",
    "exactly max audio",
    "exactly max text",
    "tiny audio",
)


def good_sample(rng: random.Random) -> tuple[str, Members]:
    """(variant, members) of a sample the library must use."""
    members = plain_sample(rng)
    audio, text = members[0][1], json.loads(members[1][1])["text"]
    variant = rng.choice(GOOD_VARIANTS + ("plain",) * 3)
    if variant == "other rate":
        rate = rng.choice([8000, 22050, 44100])
        members[0] = ("flac", encode(wave(rng, rng.uniform(0.05, 0.3), rate), rate))
    elif variant == "stereo":
        members[0] = ("flac", encode(wave(rng, rng.uniform(0.05, 0.3), channels=2)))
    elif variant == "wav":
        members[0] = ("wav", encode(wave(rng, rng.uniform(0.05, 0.3)), fmt="WAV"))
    elif variant == "json first":
        members.reverse()
    elif variant == "upper-case extensions":  # webdataset lower-cases them
        members = [("FLAC", audio), ("JSON", members[1][1])]
    elif variant == "extra member":
        members.insert(1, ("txt", text.encode()))
    elif variant == "rich json":
        meta = {"text": f"  ünïcödé {text} 日本 ", "task": "asr", "speaker": rng.randrange(9)}
        members[1] = ("json", dumps({**meta, "extra": {"nested": [1, None, 2.5]}}))
    elif variant == "exactly max audio":  # the limits are inclusive
        members[0] = ("flac", encode(wave(rng, MAX_AUDIO_SECONDS)))
    elif variant == "exactly max text":
        members[1] = ("json", dumps({"text": ("x" * MAX_TEXT_CHARS)}))
    elif variant == "tiny audio":
        members[0] = ("flac", encode(wave(rng, rng.randint(1, 40) / RATE)))
    return variant, members


# ------------------------------------------------------------------------------ mutations


def _with_json(json_bytes: bytes):
    return lambda rng, m: [m[0], ("json", json_bytes)]


def _with_meta(make):
    return lambda rng, m: [m[0], ("json", dumps(make(rng)))]


def _with_audio(make):
    return lambda rng, m: [("flac", make(rng, m[0][1])), m[1]]


def _truncated_json(rng: random.Random, m: Members) -> Members:
    full = dumps({"text": words(rng), "duration": 0.2})
    return [m[0], ("json", full[: rng.randrange(1, len(full) - 1)])]


def _not_json(rng: random.Random, m: Members) -> Members:
    junk = rng.choice([b"{not json", b"text: one two", b"{'text': 'single quotes'}", b"\x00\x01"])
    return [m[0], ("json", junk)]


def _deep_json(rng: random.Random, m: Members) -> Members:
    depth = rng.randint(5_000, 20_000)  # far past Python's recursion limit
    return [m[0], ("json", b'{"text": "one", "x": ' + b"[" * depth + b"]" * depth + b"}")]


def _truncated_flac(rng: random.Random, audio: bytes) -> bytes:
    return audio[: rng.randrange(1, len(audio) - 1)]


def _garbage(rng: random.Random, audio: bytes) -> bytes:
    prefix = rng.choice([b"", b"RIFF", b"fLaC", b"OggS"])
    return prefix + bytes(rng.randrange(256) for _ in range(rng.randint(1, 600)))


def _long_audio(rng: random.Random, m: Members) -> Members:
    rate = rng.choice([RATE, 8000])
    seconds = rng.uniform(MAX_AUDIO_SECONDS + 0.05, 3 * MAX_AUDIO_SECONDS)
    return [("flac", encode(wave(rng, seconds, rate), rate)), m[1]]


def _empty_wav(rng: random.Random, m: Members) -> Members:
    return [("wav", encode(np.zeros((0, rng.choice([1, 2])), np.float32), fmt="WAV")), m[1]]


# kind -> (ideal reason, members of a good sample -> mutated members)
BAD_KINDS = {
    "json not json": ("bad json", _not_json),
    "json truncated": ("bad json", _truncated_json),
    "json empty member": ("bad json", _with_json(b"")),
    "json invalid utf-8": ("bad json", _with_json(b'{"text": "caf\xe9 \xff"}')),
    "json trailing data": ("bad json", _with_json(b'{"text": "one"} {"text": "two"}')),
    "json array": ("bad json", _with_json(b'[{"text": "one"}]')),
    "json string": ("bad json", _with_json(b'"text: one"')),
    "json number": ("bad json", _with_json(b"42")),
    "json null": ("bad json", _with_json(b"null")),
    "json nested too deep": ("bad json", _deep_json),
    "text field absent": ("missing text", _with_meta(lambda r: {"transcript": words(r)})),
    "text field misspelt": ("missing text", _with_meta(lambda r: {"Text": words(r)})),
    "text empty": ("missing text", _with_meta(lambda r: {"text": ""})),
    "text whitespace": ("missing text", _with_meta(lambda r: {"text": " \t\n "})),
    "text null": ("missing text", _with_meta(lambda r: {"text": None})),
    "text number": ("missing text", _with_meta(lambda r: {"text": r.randint(0, 99)})),
    "text bool": ("missing text", _with_meta(lambda r: {"text": True})),
    "text list": ("missing text", _with_meta(lambda r: {"text": [words(r)]})),
    "text object": ("missing text", _with_meta(lambda r: {"text": {"en": words(r)}})),
    "text duplicate key, last empty": (
        "missing text",
        lambda rng, m: [m[0], ("json", b'{"text": "one", "text": ""}')],
    ),
    "json member absent": ("missing json", lambda rng, m: [m[0]]),
    "json member misnamed": ("missing json", lambda rng, m: [m[0], ("jsn", m[1][1])]),
    "audio member absent": ("missing audio", lambda rng, m: [m[1]]),
    "audio member misnamed": ("missing audio", lambda rng, m: [("bin", m[0][1]), m[1]]),
    "audio garbage": ("undecodable audio", _with_audio(_garbage)),
    "audio zero bytes": ("undecodable audio", _with_audio(lambda rng, a: b"")),
    "flac truncated": ("undecodable audio", _with_audio(_truncated_flac)),
    "flac metadata only": (
        "undecodable audio",
        _with_audio(lambda r, a: a[: flac_metadata_end(a)]),
    ),
    "flac without frames": ("empty audio", _with_audio(lambda rng, a: flac_without_frames(a))),
    "wav without frames": ("empty audio", _empty_wav),
    "audio too long": ("audio too long", _long_audio),
    "text too long": (
        "text too long",
        _with_meta(lambda r: {"text": "x" * r.randint(MAX_TEXT_CHARS + 1, 40 * MAX_TEXT_CHARS)}),
    ),
}


# ------------------------------------------------------------------------------ the corpus


@dataclass
class Corpus:
    folder: Path
    truth: dict[str, tuple[str, str]] = field(default_factory=dict)  # key -> (kind, reason)
    non_tar_files: int = 0

    @property
    def good(self) -> set[str]:
        return {k for k, (_, reason) in self.truth.items() if reason == GOOD}

    @property
    def bad(self) -> set[str]:
        return set(self.truth) - self.good

    def expected(self) -> dict[str, int]:
        """Skips per reason: one per bad sample under its reason, plus one per non-tar file."""
        counts: Counter[str] = Counter({UNREADABLE: self.non_tar_files})
        for _, reason in self.truth.values():
            if reason != GOOD:
                counts[reason] += 1
        return {reason: n for reason, n in counts.items() if n}


def write_tar(samples: list[tuple[str, Members]]) -> tuple[bytes, dict[str, int]]:
    """Tar bytes of ``samples`` (key, members) and the header offset of each key's first
    member."""
    buf = io.BytesIO()
    first_header: dict[str, int] = {}
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for key, members in samples:
            first_header[key] = tar.offset
            for ext, data in members:
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mtime, info.mode = len(data), 1_700_000_000, 0o644
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue(), first_header


def damage(data: bytes, header: int, kind: str, rng: random.Random) -> bytes:
    """``data`` with ``kind`` of damage at the member header at byte ``header`` (whose member's
    data is at least 2 bytes and starts at ``header + 512``)."""
    size = int(data[header + 124 : header + 135], 8)
    if kind == "tar truncated in member data":
        return data[: header + 512 + rng.randrange(1, size)]
    if kind == "tar truncated in member header":
        return data[: header + rng.randrange(1, 512)]
    if kind == "tar truncated at member boundary":
        return data[:header]
    if kind == "tar member header garbage":  # name field: the checksum no longer matches
        junk = bytes(rng.randrange(1, 256) for _ in range(100))
        return data[:header] + junk + data[header + 100 :]
    raise ValueError(kind)


def build_corpus(folder: Path, seed: int = SEED) -> Corpus:
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    corpus = Corpus(folder)
    damaged = {shard: kind for kind, shard in TAR_DAMAGE.items()}
    # samples that get a mutation: every kind at least once, the rest drawn at random
    slots = [
        (s, i)
        for s in range(N_SHARDS)
        for i in range(PER_SHARD)
        if not (s in damaged and i == PER_SHARD - 1)
    ]
    rng.shuffle(slots)
    kinds = list(BAD_KINDS)
    n_bad = N_BAD - len(damaged)
    plan = {
        slot: kinds[j] if j < len(kinds) else rng.choice(kinds)
        for j, slot in enumerate(slots[:n_bad])
    }
    names = [f"shard-{i:02d}.tar" for i in range(N_SHARDS + 1)]
    (folder / names.pop(NON_TAR_INDEX)).write_bytes(NOT_A_TAR)
    corpus.non_tar_files = 1
    for shard, name in enumerate(names):
        samples = []
        for i in range(PER_SHARD):
            key = f"s{shard}-{i:03d}"
            kind = plan.get((shard, i))
            if shard in damaged and i == PER_SHARD - 1:  # lost with the shard's tail
                members = plain_sample(rng)
                corpus.truth[key] = (damaged[shard], UNREADABLE)
            elif kind is not None:
                reason, mutate = BAD_KINDS[kind]
                members = mutate(rng, plain_sample(rng))
                corpus.truth[key] = (kind, reason)
            else:
                variant, members = good_sample(rng)
                corpus.truth[key] = (f"good: {variant}", GOOD)
            samples.append((key, members))
        data, headers = write_tar(samples)
        if shard in damaged:
            data = damage(data, headers[samples[-1][0]], damaged[shard], rng)
        (folder / name).write_bytes(data)
    return corpus


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Corpus:
    built = build_corpus(tmp_path_factory.mktemp("fuzz") / "shards")
    assert len(built.truth) == N_SHARDS * PER_SHARD >= 600
    assert len(built.bad) == N_BAD >= 500
    covered = {kind for kind, _ in built.truth.values()}
    assert set(BAD_KINDS) | set(TAR_DAMAGE) <= covered
    assert {f"good: {v}" for v in GOOD_VARIANTS} <= covered
    return built


# ------------------------------------------------------------------------------ the tests


def check_epoch(corpus: Corpus, num_workers: int) -> None:
    keys, by_reason, total = read_epoch(corpus.folder, num_workers)
    seen = Counter(keys)
    twice = {k: n for k, n in seen.items() if n > 1}
    assert not twice, f"keys yielded more than once: {twice}"
    leaked = {k: corpus.truth.get(k, ("unknown key", "?"))[0] for k in set(seen) - corpus.good}
    assert not leaked, f"bad samples in batches: {leaked}"
    lost = {k: corpus.truth[k][0] for k in corpus.good - set(seen)}
    assert not lost, f"good samples lost: {lost}"
    expected = corpus.expected()
    assert by_reason == expected
    # every bad sample is counted once, under its reason, and the non-tar file once
    assert total == sum(by_reason.values()) == len(corpus.bad) + corpus.non_tar_files


@pytest.mark.parametrize("num_workers", [0, 2])
def test_fuzz_epoch(corpus: Corpus, num_workers: int) -> None:
    """The epoch ends, good samples are used once each, bad ones are counted by reason."""
    check_epoch(corpus, num_workers)


# ------------------------------------------------------------------------------ indexed shards
# With an index.json (as prepare writes it), a cut shard costs exactly the samples it lost: its
# surviving samples are read, the index's count says how many never arrived. Each shard of this
# corpus is cut at one member boundary (0 bytes kept ... all members kept, end-of-archive blocks
# lost), so every boundary is covered; a cut after a sample's FLAC leaves a sample without JSON.

PER_CUT_SHARD = 4
LOST = "lost in damaged shard"


def write_indexed(folder: Path, shards: dict[str, tuple[bytes, bytes, int]]) -> None:
    """Write ``name -> (full tar, bytes on disk, samples)`` and an index of the full tars."""
    import hashlib

    from mmalign.data.index import ShardInfo, write_index

    folder.mkdir(parents=True, exist_ok=True)
    infos = []
    for name, (full, on_disk, samples) in shards.items():
        (folder / name).write_bytes(on_disk)
        infos.append(ShardInfo(name, samples, 1.0, len(full), hashlib.sha256(full).hexdigest()))
    write_index(folder, {"source": "fuzz"}, infos)


def member_headers(data: bytes) -> list[int]:
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return [m.offset for m in tar.getmembers()]


def build_cut_corpus(folder: Path, seed: int = SEED) -> tuple[set[str], dict[str, int]]:
    """(good keys, expected skips per reason) of shards cut at every member boundary."""
    rng = random.Random(seed)
    samples = [(f"c-{i}", plain_sample(rng)) for i in range(PER_CUT_SHARD)]
    full, _ = write_tar(samples)
    headers = member_headers(full)
    cuts = [*headers, headers[-1] + 512 + len(samples[-1][1][-1][1])]  # ... end of last member
    good: set[str] = set()
    expected: Counter[str] = Counter()
    shards = {}
    for n, cut in enumerate(cuts):  # n members survive
        renamed = [(f"s{n}-{k}", m) for k, m in samples]
        data, _ = write_tar(renamed)
        shards[f"cut-{n:02d}.tar"] = (data, data[:cut], PER_CUT_SHARD)
        good |= {key for key, _ in renamed[: n // 2]}
        expected[LOST] += PER_CUT_SHARD - (n + 1) // 2
        expected["missing json"] += n % 2
    write_indexed(folder, shards)
    return good, {k: v for k, v in expected.items() if v}


@pytest.mark.parametrize("num_workers", [0, 2])
def test_cut_at_every_member_boundary_loses_exactly_the_missing_samples(tmp_path, num_workers):
    good, expected = build_cut_corpus(tmp_path / "cut")
    keys, by_reason, total = read_epoch(tmp_path / "cut", num_workers)
    assert sorted(keys) == sorted(good)
    assert by_reason == expected
    assert total == (2 * PER_CUT_SHARD + 1) * PER_CUT_SHARD - len(good)


def test_a_shared_cut_shard_is_counted_once_when_workers_split_its_samples(tmp_path):
    rng = random.Random(SEED)
    samples = [(f"k{i}", plain_sample(rng)) for i in range(6)]
    full, headers = write_tar(samples)
    write_indexed(tmp_path / "one", {"only.tar": (full, full[: headers["k4"]], 6)})
    keys, by_reason, _ = read_epoch(tmp_path / "one", num_workers=2)  # both workers read it
    assert sorted(keys) == [f"k{i}" for i in range(4)]
    assert by_reason == {LOST: 2}


def _mismatch(folder: Path, kind: str) -> None:
    from mmalign.data.index import INDEX_NAME

    rng = random.Random(SEED)
    full, _ = write_tar([(f"m{i}", plain_sample(rng)) for i in range(5)])
    write_indexed(folder, {"a.tar": (full, full, 5), "b.tar": (full, full, 5)})
    index = json.loads((folder / INDEX_NAME).read_text())
    if kind == "count edited":
        index["shards"][1]["samples"] = 3
    elif kind == "shard replaced by a larger one":
        (folder / "b.tar").write_bytes(full + bytes(10240))
    elif kind == "shard missing":
        (folder / "b.tar").unlink()
    elif kind == "undercount, no sizes":
        for entry in index["shards"]:
            entry.pop("bytes"), entry.pop("sha256")
        index.pop("shards_sha256")
        index["shards"][1]["samples"] = 3
    (folder / INDEX_NAME).write_text(json.dumps(index))


@pytest.mark.parametrize(
    "kind, message",
    [
        ("count edited", "does not match its checksum"),
        ("shard replaced by a larger one", r"b.tar: \d+ bytes but .* lists \d+: not the shard"),
        ("shard missing", "shard b.tar is missing"),
        ("undercount, no sizes", "b.tar: holds 5 samples but .* lists 3"),
    ],
)
def test_an_index_that_disagrees_with_its_shards_is_refused_at_start_up(tmp_path, kind, message):
    _mismatch(tmp_path / "m", kind)
    with pytest.raises(FileNotFoundError, match=message):
        ShardDataModule(train=str(tmp_path / "m"))


def test_an_overcounting_index_without_sizes_counts_the_samples_that_never_came(tmp_path):
    from mmalign.data.index import INDEX_NAME

    folder = tmp_path / "over"
    _mismatch(folder, "undercount, no sizes")
    index = json.loads((folder / INDEX_NAME).read_text())
    index["shards"][1]["samples"] = 8  # three more than the shard holds
    (folder / INDEX_NAME).write_text(json.dumps(index))
    keys, by_reason, total = read_epoch(folder, num_workers=0)
    assert len(keys) == 10 and by_reason == {LOST: 3} and total == 3
