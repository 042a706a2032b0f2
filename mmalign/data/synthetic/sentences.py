"""Open-vocabulary offline corpus: English sentences of several registers, several synthesisers.

Ten spoken digits teach an LLM nothing about open speech; no real corpus can be downloaded
here. This one takes sentences from three offline text sources of different registers
(Debian's fortune databases: quotations and jokes; the English messages of the gettext
catalogs: software; installed package descriptions: technical prose) and speaks them with three
synthesisers built on different methods: espeak-ng (formant, many accents and variants), flite
(diphone and clustergen voices) and festival (diphone LPC and HTS voices), each with seeded
random speed and pitch. Splits:

* ``train``: training voices of espeak-ng and flite; training sentences;
* ``val``: training voices, sentences never in train (choose settings here);
* ``test``: held-out espeak-ng and flite voices, sentences never in train or val;
* ``test_synth``: festival only (a synthesiser never heard in training), the test sentences.

Sentences are split before any is spoken, so no two splits share a sentence, and no voice of
``test`` or ``test_synth`` speaks in ``train`` or ``val``. Manifest lines are those of
:mod:`mmalign.data.synthetic.espeak` plus ``synth`` and ``source`` (the text's register). The
text pool depends on the packages installed (fortunes, gettext catalogs): the same seed gives
the same corpus on the same system.
"""

from __future__ import annotations

import glob
import json
import random
import re
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from mmalign.data.synthetic.espeak import (
    MissingToolError,
    draw_prosody,
    english_voices,
    sox_to_16k,
    split_voices,
)
from mmalign.data.synthetic.translation import LOCALE_DIR, _read_catalog, clean_message

INSTALL_HINT = (
    "sudo apt-get install espeak-ng sox flite festival festvox-kallpc16k festvox-kdlpc16k "
    "festvox-us-slt-hts fortunes-min"
)
SPLITS = ("train", "val", "test", "test_synth")
FORTUNES = "/usr/share/games/fortunes"
DPKG_STATUS = "/var/lib/dpkg/status"
FLITE_VOICES = ("awb", "kal", "kal16", "rms", "slt")  # awb_time speaks only the time
FESTIVAL_VOICES = ("kal_diphone", "ked_diphone", "cmu_us_slt_arctic_hts")
MIN_WORDS, MAX_WORDS = 4, 16

# What a reader says as written: letters and plain punctuation; no digits (a "3" could be said
# "three" or "third"), brackets, symbols, camelCase identifiers or shouted words.
_SPEAKABLE = re.compile(r"[A-Za-z ,.;:!?'\"-]+")
_ODD_WORD = re.compile(r"\b[a-z]+[A-Z]|\b[A-Z]{2,}[a-z]|\b[A-Z]{4,}\b")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'])")


def speakable(text: str) -> bool:
    """A sentence to keep: 4-16 words, letters and plain punctuation, a capital first and a full
    stop, question or exclamation mark last."""
    words = text.split()
    return (
        MIN_WORDS <= len(words) <= MAX_WORDS
        and _SPEAKABLE.fullmatch(text) is not None
        and text[0].isupper()
        and text[-1] in ".?!"
        and not _ODD_WORD.search(text)
        and "--" not in text
    )


def _sentences(paragraph: str) -> list[str]:
    return [s for s in _SENTENCE_END.split(" ".join(paragraph.split())) if speakable(s)]


def fortune_sentences(root: str = FORTUNES) -> set[str]:
    """Sentences of every fortune database under ``root`` (entries end at a ``%`` line)."""
    found: set[str] = set()
    for path in sorted(glob.glob(f"{root}/*")):
        if "." in Path(path).name or not Path(path).is_file():  # .dat indexes, .u8 links
            continue
        text = Path(path).read_text(encoding="utf-8", errors="replace")
        for entry in re.split(r"^%$", text, flags=re.M):
            found.update(_sentences(entry))
    return found


def gettext_sentences(locale_dir: str = LOCALE_DIR, langs: tuple[str, ...] = ("de", "fr")) -> set:
    """English sentences among the message ids of the gettext catalogs of ``langs``."""
    found: set[str] = set()
    for lang in langs:
        for path in sorted(Path(locale_dir, lang, "LC_MESSAGES").glob("*.mo")):
            try:
                ids = _read_catalog(path)
            except (OSError, UnicodeDecodeError, ValueError):
                continue  # a catalog in an odd charset: others hold the same messages
            found.update(s for s in map(clean_message, ids) if speakable(s))
    return found


def package_sentences(status: str = DPKG_STATUS) -> set[str]:
    """Sentences of the long descriptions of the installed packages (dpkg's status file)."""
    if not Path(status).is_file():
        return set()
    text = Path(status).read_text(encoding="utf-8", errors="replace")
    found: set[str] = set()
    for body in re.findall(r"^Description: .*\n((?: .*\n)*)", text, flags=re.M):
        found.update(_sentences(" ".join(ln.strip() for ln in body.splitlines() if ln != " .")))
    return found


def text_pool() -> list[tuple[str, str]]:
    """``(sentence, source)`` pairs, each sentence once (the first source that has it), sorted."""
    pool: dict[str, str] = {}
    for source, found in (
        ("fortunes", fortune_sentences()),
        ("gettext", gettext_sentences()),
        ("packages", package_sentences()),
    ):
        for s in sorted(found):
            pool.setdefault(s, source)
    if len(pool) < 100:
        raise MissingToolError(
            f"only {len(pool)} offline sentences found (fortunes in {FORTUNES}, gettext catalogs "
            f"in {LOCALE_DIR}, {DPKG_STATUS}); install more text with: {INSTALL_HINT}"
        )
    return sorted(pool.items())


def check_tools() -> None:
    """Raise :class:`MissingToolError` naming what is missing and how to install it."""
    missing = [t for t in ("espeak-ng", "sox", "flite", "text2wave") if shutil.which(t) is None]
    if missing:
        raise MissingToolError(
            f"{', '.join(missing)} not found on PATH; the sentences corpus needs three "
            f"synthesisers. Install them with: {INSTALL_HINT}"
        )


@dataclass(frozen=True)
class Utterance:
    key: str
    split: str
    text: str
    source: str
    synth: str
    voice: str
    speed: int  # espeak-ng: words a minute; flite and festival: 100 / duration stretch
    pitch: int  # espeak-ng: 0-99; flite: mean F0 in Hz; festival: unused

    @property
    def audio(self) -> str:
        return f"{self.split}/{self.key}.wav"


def _prosody(rng: random.Random, synth: str) -> tuple[int, int]:
    if synth == "espeak":
        return draw_prosody(rng)
    return rng.randint(80, 120), rng.randint(90, 200) if synth == "flite" else 0


def plan(
    pool: list[tuple[str, str]],
    counts: dict[str, int],
    seed: int,
    *,
    espeak_voices: tuple[str, ...] | list[str],
    held_out_voices: int = 8,
    flite_share: float = 0.3,
) -> tuple[list[Utterance], dict[str, list[str]]]:
    """Utterances and the voices of each split; all random draws from one seeded generator."""
    rng = random.Random(seed)
    esp_train, esp_test = split_voices(rng, espeak_voices, held_out_voices)
    flite_train, flite_test = split_voices(rng, [f"flite:{v}" for v in FLITE_VOICES], 1)
    voices = {
        "train": esp_train + flite_train,
        "test": esp_test + flite_test,
        "test_synth": [f"festival:{v}" for v in FESTIVAL_VOICES],
    }
    order = list(pool)
    rng.shuffle(order)
    n_eval = {s: min(counts[s], max(1, len(order) // 10)) for s in ("val", "test")}
    texts = {
        "val": order[: n_eval["val"]],
        "test": order[n_eval["val"] : n_eval["val"] + n_eval["test"]],
        "train": order[n_eval["val"] + n_eval["test"] :],
    }
    texts["test_synth"] = texts["test"]
    utterances = []
    for split in SPLITS:
        sentences = list(texts[split])
        rng.shuffle(sentences)
        pool_voices = voices["train" if split == "val" else split]
        for i in range(counts[split]):
            text, source = sentences[i % len(sentences)]
            if split == "test_synth":
                voice = rng.choice(pool_voices)
            else:  # flite_share of the utterances from flite's few voices
                use_flite = rng.random() < flite_share
                voice = rng.choice([v for v in pool_voices if v.startswith("flite:") == use_flite])
            synth = voice.split(":")[0] if ":" in voice else "espeak"
            speed, pitch = _prosody(rng, synth)
            voice = voice.split(":")[-1]
            utterances.append(
                Utterance(f"{split}-{i:06d}", split, text, source, synth, voice, speed, pitch)
            )
    return utterances, voices


def _speak(u: Utterance, raw: Path) -> subprocess.CompletedProcess:
    if u.synth == "espeak":
        cmd = ["espeak-ng", "-v", u.voice, "-s", str(u.speed), "-p", str(u.pitch)]
        return subprocess.run(
            [*cmd, "-w", str(raw), "--stdin"], input=u.text, capture_output=True, text=True
        )
    if u.synth == "flite":
        cmd = ["flite", "-voice", u.voice, "--setf", f"duration_stretch={100 / u.speed:.3f}"]
        cmd += ["--setf", f"int_f0_target_mean={u.pitch}", "-t", u.text, "-o", str(raw)]
        return subprocess.run(cmd, capture_output=True, text=True)
    stretch = f"(Parameter.set 'Duration_Stretch {100 / u.speed:.3f})"
    cmd = ["text2wave", "-eval", f"(voice_{u.voice})", "-eval", stretch, "-o", str(raw)]
    return subprocess.run(cmd, input=u.text, capture_output=True, text=True)


def _synthesize_one(u: Utterance, out_dir: Path) -> None:
    target = out_dir / u.audio
    raw = target.with_name(f".{u.key}.raw.wav")
    try:
        done = _speak(u, raw)
        if done.returncode != 0 or not raw.is_file() or raw.stat().st_size <= 44:
            raise RuntimeError(f"{u.synth} failed for {u.key} ({u.voice}): {done.stderr.strip()}")
        sox_to_16k([str(raw)], target, u.key)
    finally:
        raw.unlink(missing_ok=True)


def synthesize_sentences(
    out_dir: str | Path,
    *,
    n_train: int,
    n_val: int,
    n_test: int,
    n_test_synth: int | None = None,
    seed: int = 0,
    held_out_voices: int = 8,
    jobs: int = 2,
) -> dict[str, Path]:
    """Synthesise the open-vocabulary corpus into ``out_dir``; returns split -> manifest path.

    ``n_test_synth`` (default ``n_test``) utterances of the test sentences are spoken by
    festival, the synthesiser held out of training."""
    counts = {"train": n_train, "val": n_val, "test": n_test}
    counts["test_synth"] = n_test if n_test_synth is None else n_test_synth
    if any(n < 0 for n in counts.values()):
        raise ValueError(f"utterance counts must be non-negative, got {counts}")
    check_tools()
    utterances, voices = plan(text_pool(), counts, seed, espeak_voices=english_voices(),
                              held_out_voices=held_out_voices)  # fmt: skip
    out = Path(out_dir)
    for split in SPLITS:
        (out / split).mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        todo = pool.map(lambda u: _synthesize_one(u, out), utterances)
        list(tqdm(todo, total=len(utterances), desc="synthesising", unit="utt"))  # re-raises
    manifests = {}
    for split in SPLITS:
        manifests[split] = out / f"{split}.jsonl"
        with open(manifests[split], "w", encoding="utf-8") as fh:
            for u in utterances:
                if u.split == split:
                    line = {"audio": u.audio, "text": u.text, "key": u.key, "voice": u.voice,
                            "synth": u.synth, "speed": u.speed, "pitch": u.pitch,
                            "source": u.source, "task": "asr"}  # fmt: skip
                    fh.write(json.dumps(line) + "\n")
    (out / "voices.json").write_text(json.dumps(voices, indent=2) + "\n", encoding="utf-8")
    return manifests
