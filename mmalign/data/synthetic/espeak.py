"""Offline demo corpus: English speech synthesised with espeak-ng, resampled with sox.

No speech corpus can be downloaded here, yet the demos and end-to-end tests need audio whose
transcript is known. espeak-ng speaks digit strings ("three one four one five") or short
Harvard-style sentences in many English voices (accents x variants), with seeded random speed
and pitch; sox converts to 16 kHz mono 16-bit with ``gain -n -1`` (normalise to -1 dBFS, no
clipping). Splits:

* ``train``: training voices;
* ``val``: training voices, texts unseen in training;
* ``test``: held-out voices (never used for train or val), texts unseen in training.

The output is one JSONL manifest per split (``<out_dir>/<split>.jsonl``, lines
``{"audio", "text", "key", "voice", "speed", "pitch", "task": "asr"}`` with audio paths relative
to ``out_dir``) that ``mmalign prepare`` turns into shards, and ``voices.json`` with the training
and held-out voice lists. Everything drawn at random comes from
one generator seeded by ``seed`` before synthesis starts, so the manifests are identical for the
same seed on the same espeak-ng installation, whatever ``jobs`` is.
"""

from __future__ import annotations

import json
import random
import shutil
import subprocess
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

INSTALL_HINT = "sudo apt-get install espeak-ng sox"
SAMPLE_RATE = 16000
KINDS = ("digits", "harvard", "mixed")
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

# Variants that stay intelligible (male, female and Klatt-synthesis timbres); the ones the local
# espeak-ng lacks are dropped. Whispering, croaking and robot variants are left out on purpose.
PREFERRED_VARIANTS = (
    "m1", "m2", "m3", "m4", "m5", "m6", "m7",
    "f1", "f2", "f3", "f4",
    "klatt", "klatt2", "klatt3",
)  # fmt: skip

# Short English sentences in the manner of the Harvard lists (written for this project).
SENTENCES = (
    "The old boat drifted slowly toward the quiet harbour.",
    "She packed three apples and a loaf of bread for the trip.",
    "A cold wind blew across the empty field at dawn.",
    "The children laughed as the kite climbed into the sky.",
    "Please close the window before the rain comes in.",
    "The red book on the top shelf belongs to my uncle.",
    "He painted the fence white on a warm spring morning.",
    "The train was late because of snow on the tracks.",
    "A small dog barked at the mail carrier every day.",
    "The soup tastes better with a pinch of salt.",
    "We walked along the river until the sun went down.",
    "The lamp on the desk gives a soft yellow light.",
    "Her brother fixed the bicycle with a borrowed wrench.",
    "The market opens early and closes before noon.",
    "Thick clouds gathered over the hills in the evening.",
    "The farmer sold fresh eggs at the village gate.",
    "A sharp knife makes the work in the kitchen easy.",
    "The clock in the hall struck nine times.",
    "They built a fire to keep warm through the night.",
    "The letter arrived a week after it was sent.",
    "Green leaves fell softly onto the wet road.",
    "The teacher wrote the answer on the board.",
    "A glass of cold water is all I need.",
    "The pilot greeted the passengers with a calm voice.",
    "Bright stars filled the sky above the desert.",
    "The baker rose before dawn to light the oven.",
    "My neighbour grows tomatoes in a sunny corner.",
    "The museum keeps old maps in a locked room.",
    "The wooden bridge creaked under the heavy cart.",
    "He found a silver coin beneath the garden bench.",
    "The storm knocked down two trees near the school.",
    "She sang a quiet song while she washed the dishes.",
    "The path to the lake is steep and narrow.",
    "A fresh coat of paint made the room look new.",
    "The cat slept all afternoon in a patch of sun.",
    "We heard the bells ringing across the valley.",
    "The doctor told him to rest for a few days.",
    "Fresh bread smells wonderful on a cold morning.",
    "The boy threw the ball over the garden wall.",
    "The ship carried grain and wool to distant ports.",
    "A gentle breeze moved the curtains by the door.",
    "The office was silent after everyone went home.",
    "They planted a row of oak trees along the lane.",
    "The small shop sells buttons, thread and needles.",
    "Her coat was too thin for the winter weather.",
    "The old man told stories about the sea.",
    "Heavy rain flooded the low part of the town.",
    "The horse trotted happily back to the stable.",
    "A loud noise woke the whole house at midnight.",
    "The recipe calls for butter, sugar and flour.",
    "The river was wide and the current was strong.",
    "He wore a blue shirt and a grey jacket.",
    "The garden gate squeaked every time it opened.",
    "She read the map carefully before the long drive.",
    "The cheese was sharp and the wine was sweet.",
    "We waited for the bus under a large umbrella.",
    "The carpenter measured the board twice before cutting.",
    "A flock of geese flew south over the lake.",
    "The candle burned low and the room grew dark.",
    "The new road will open at the end of summer.",
    "He keeps his tools in a box under the stairs.",
    "The music drifted out through the open window.",
    "The hikers rested beside a cool mountain stream.",
    "Her voice carried clearly across the crowded hall.",
    "The price of fruit rose sharply this year.",
    "A thin layer of frost covered the car.",
    "The students listened closely to the lecture.",
    "The kettle whistled loudly on the stove.",
    "They painted the boat bright orange and white.",
    "The stone wall kept the sheep out of the field.",
    "The radio played old songs all evening.",
    "She tied the package with a length of string.",
    "The fisherman mended his nets on the beach.",
    "A warm blanket lay folded at the foot of the bed.",
    "The path was lined with tall yellow flowers.",
    "He poured the milk into a large white jug.",
    "The wind turned the pages of the open book.",
    "Our guests arrived just as the meal was ready.",
    "The chimney smoke rose straight into the still air.",
    "The puppy chewed the corner of the rug.",
    "The mayor spoke briefly at the opening of the park.",
    "A narrow stair led up to the attic room.",
    "The orchard was full of ripe pears and plums.",
    "She kept the letters in a wooden chest.",
    "The workers finished the roof before the rain.",
    "The lighthouse beam swept across the dark water.",
    "He bought a pair of boots for the hiking trip.",
    "The pond froze solid during the long winter.",
    "The baby smiled at the bright colours of the toy.",
    "A row of lamps lit the edge of the square.",
    "The tailor cut the cloth with great care.",
    "The hot sun dried the washing in an hour.",
    "They rowed the small boat across the bay.",
    "The owl called softly from the tall pine tree.",
    "The tea was strong and the cake was fresh.",
    "A long queue formed outside the theatre door.",
    "The mountain road twists through the forest.",
    "He whistled a tune as he walked to work.",
    "The shelves were stacked with jars of honey.",
    "The choir practised every Thursday evening.",
)


class MissingToolError(RuntimeError):
    """espeak-ng or sox is not installed."""


@dataclass(frozen=True)
class _Utterance:
    key: str
    split: str
    text: str
    voice: str
    speed: int
    pitch: int

    @property
    def audio(self) -> str:
        return f"{self.split}/{self.key}.wav"


def check_tools() -> None:
    """Raise :class:`MissingToolError` with the install command if a tool is missing."""
    missing = [tool for tool in ("espeak-ng", "sox") if shutil.which(tool) is None]
    if missing:
        raise MissingToolError(
            f"{' and '.join(missing)} not found on PATH; the synthetic corpus needs espeak-ng and "
            f"sox. Install them with: {INSTALL_HINT}"
        )


def _espeak_table(arg: str) -> list[list[str]]:
    out = subprocess.run(
        ["espeak-ng", f"--voices={arg}"], capture_output=True, text=True, check=True
    ).stdout
    return [line.split() for line in out.splitlines()[1:] if line.strip()]


@lru_cache(maxsize=1)
def english_voices() -> tuple[str, ...]:
    """Every ``accent+variant`` voice available locally (accents from ``--voices=en`` that use
    espeak's own synthesiser, variants from ``--voices=variant``), sorted."""
    check_tools()
    accents = sorted(
        {row[1] for row in _espeak_table("en") if len(row) >= 5 and row[4].startswith("gmw/")}
    )
    installed = {row[4][3:] for row in _espeak_table("variant") if len(row) >= 5}
    variants = [v for v in PREFERRED_VARIANTS if v in installed]
    voices = list(accents) + [f"{a}+{v}" for a in accents for v in variants]
    if not voices:
        raise MissingToolError(f"espeak-ng lists no English voices; reinstall: {INSTALL_HINT}")
    return tuple(sorted(voices))


def digits_text(rng: random.Random, min_digits: int, max_digits: int) -> str:
    """Digits written as words, e.g. ``"three one four"``: what is said is the transcript."""
    n = rng.randint(min_digits, max_digits)
    return " ".join(rng.choice(DIGIT_WORDS) for _ in range(n))


def _plan(
    kind: str,
    counts: dict[str, int],
    seed: int,
    held_out_voices: int,
    min_digits: int,
    max_digits: int,
) -> tuple[list[_Utterance], list[str], list[str]]:
    rng = random.Random(seed)
    train_voices, held_out = split_voices(rng, english_voices(), held_out_voices)

    sentences = list(SENTENCES)
    rng.shuffle(sentences)
    n_eval = max(1, len(sentences) // 10)
    sentence_pools = {
        "val": sentences[:n_eval],
        "test": sentences[n_eval : 2 * n_eval],
        "train": sentences[2 * n_eval :],
    }
    train_digits: set[str] = set()

    def text_for(split: str) -> str:
        use_digits = kind == "digits" or (kind == "mixed" and rng.random() < 0.5)
        if not use_digits:
            return rng.choice(sentence_pools[split])
        for _ in range(1000):  # val/test digit strings never occur in train
            text = digits_text(rng, min_digits, max_digits)
            if split == "train" or text not in train_digits:
                break
        if split == "train":
            train_digits.add(text)
        return text

    utterances: list[_Utterance] = []
    for split in ("train", "val", "test"):
        pool = held_out if split == "test" else train_voices
        for i in range(counts[split]):
            text = text_for(split)
            voice = rng.choice(pool)
            speed, pitch = draw_prosody(rng)
            utterances.append(_Utterance(f"{split}-{i:06d}", split, text, voice, speed, pitch))
    return utterances, train_voices, held_out


def split_voices(
    rng: random.Random, voices: tuple[str, ...] | list[str], held_out_voices: int
) -> tuple[list[str], list[str]]:
    """``(train_voices, held_out)``: ``held_out_voices`` voices drawn for the test split only, so
    that test scores measure generalisation to unseen speakers."""
    voices = list(voices)
    if not 0 < held_out_voices < len(voices):
        raise ValueError(f"held_out_voices must be in 1..{len(voices) - 1}, got {held_out_voices}")
    held_out = sorted(rng.sample(voices, held_out_voices))
    train_voices = [v for v in voices if v not in set(held_out)]
    return train_voices, held_out


def draw_prosody(rng: random.Random) -> tuple[int, int]:
    """Random espeak-ng ``(speed, pitch)``: words per minute and pitch (0-99), ranges that stay
    intelligible, so that one voice does not always sound the same."""
    return rng.randint(130, 200), rng.randint(30, 70)


def _synthesize_one(utt: _Utterance, out_dir: Path) -> None:
    target = out_dir / utt.audio
    raw = target.with_name(f".{utt.key}.espeak.wav")
    try:
        speak = subprocess.run(
            ["espeak-ng", "-v", utt.voice, "-s", str(utt.speed), "-p", str(utt.pitch),
             "-w", str(raw), "--stdin"],
            input=utt.text, capture_output=True, text=True,
        )  # fmt: skip
        if speak.returncode != 0 or not raw.is_file() or raw.stat().st_size <= 44:
            raise RuntimeError(f"espeak-ng failed for {utt.key} ({utt.voice}): {speak.stderr}")
        sox_to_16k([str(raw)], target, utt.key)
    finally:
        raw.unlink(missing_ok=True)


def sox_to_16k(source: list[str], target: Path, key: str, stdin: bytes | None = None) -> None:
    """Convert with sox to 16 kHz mono 16-bit, normalised to -1 dBFS (``gain -n -1``).

    ``source`` is sox's input (a path, or format options and ``-`` to read ``stdin``). ``-R``
    seeds sox's dither, so the same input gives the same bytes."""
    convert = subprocess.run(
        ["sox", "-R", *source, "-r", str(SAMPLE_RATE), "-c", "1", "-b", "16", str(target),
         "gain", "-n", "-1"],
        input=stdin, capture_output=True,
    )  # fmt: skip
    if convert.returncode != 0:
        raise RuntimeError(f"sox failed for {key}: {convert.stderr.decode(errors='replace')}")


def synthesize(
    out_dir: str | Path,
    *,
    kind: str = "digits",
    n_train: int,
    n_val: int,
    n_test: int,
    seed: int = 0,
    held_out_voices: int = 8,
    min_digits: int = 3,
    max_digits: int = 8,
    jobs: int = 2,
) -> dict[str, Path]:
    """Synthesise a train/val/test corpus into ``out_dir``; returns split -> manifest path.

    ``kind`` is ``"digits"`` (spoken digit strings of ``min_digits``..``max_digits`` words),
    ``"harvard"`` (the 100 sentences above) or ``"mixed"`` (either, half and half).
    ``held_out_voices`` voices are kept for the test split only. ``jobs`` synthesis processes
    run at once.
    """
    counts = _check_args(kind, n_train, n_val, n_test, min_digits, max_digits)
    check_tools()
    out = Path(out_dir)
    utterances, train_voices, held_out = _plan(
        kind, counts, seed, held_out_voices, min_digits, max_digits
    )
    for split in counts:
        (out / split).mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        # list() re-raises the first failure
        list(pool.map(lambda u: _synthesize_one(u, out), utterances))

    return _write_manifests(out, utterances, train_voices, held_out, _asr_line)


def _asr_line(u: _Utterance) -> dict:
    return {
        "audio": u.audio,
        "text": u.text,
        "key": u.key,
        "voice": u.voice,
        "speed": u.speed,
        "pitch": u.pitch,
        "task": "asr",
    }


def _check_args(
    kind: str, n_train: int, n_val: int, n_test: int, min_digits: int, max_digits: int
) -> dict[str, int]:
    """Validate the corpus arguments; returns split -> utterance count."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if not 1 <= min_digits <= max_digits:
        raise ValueError(f"need 1 <= min_digits <= max_digits, got {min_digits}, {max_digits}")
    counts = {"train": n_train, "val": n_val, "test": n_test}
    if any(n < 0 for n in counts.values()):
        raise ValueError(f"utterance counts must be non-negative, got {counts}")
    return counts


def _write_manifests(
    out: Path,
    utterances: list[_Utterance],
    train_voices: list[str],
    held_out: list[str],
    line: Callable[[_Utterance], dict],
) -> dict[str, Path]:
    """Write ``<split>.jsonl`` (one ``line(u)`` per utterance) and ``voices.json``."""
    manifests: dict[str, Path] = {}
    for split in ("train", "val", "test"):
        path = out / f"{split}.jsonl"
        with open(path, "w", encoding="utf-8") as fh:
            for u in utterances:
                if u.split == split:
                    fh.write(json.dumps(line(u), ensure_ascii=False) + "\n")
        manifests[split] = path
    voices = {"train": train_voices, "held_out": held_out}
    (out / "voices.json").write_text(json.dumps(voices, indent=2) + "\n", encoding="utf-8")
    return manifests
