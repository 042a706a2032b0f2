"""Offline speech-translation demo corpus: English speech (espeak-ng) with German/French targets.

No speech-translation corpus can be downloaded here, but Debian's gettext catalogs
(``/usr/share/locale/<lang>/LC_MESSAGES/*.mo``) hold thousands of English messages with human
translations. :func:`gettext_pairs` keeps the sentence-like ones that are translated into every
requested language; :func:`synthesize_st` speaks the English with the voices, speeds and pitches
of :mod:`mmalign.data.synthetic.espeak` and writes one JSONL manifest per split::

    {"audio", "text" (English), "translation": {"de": ..., "fr": ...}, "source_lang": "en",
     "key", "voice", "speed", "pitch", "task": "asr"}

``task`` stays ``asr``: the same sample serves ASR and ST, the task is chosen when training.
Splits are made by sentence, so BLEU on val/test measures translation of unseen sentences:

* ``train``: training voices; sentences reused with other voices when ``n_train`` exceeds them;
* ``val``: training voices, sentences never in train;
* ``test``: held-out voices, sentences never in train or val.

The messages are software strings ("Cannot open the file.", "You must specify a repository to
clone."): short, technical and often imperative, good enough to show that a model learns to
translate what it hears, not a benchmark.
"""

from __future__ import annotations

import gettext
import logging
import random
import re
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from mmalign.data.synthetic.espeak import (
    _synthesize_one,
    _Utterance,
    _write_manifests,
    check_tools,
    draw_prosody,
    english_voices,
    split_voices,
)

log = logging.getLogger(__name__)

LOCALE_DIR = "/usr/share/locale"
SOURCE_LANG = "en"
MIN_WORDS, MAX_WORDS = 3, 20

# English that espeak-ng reads as written: ASCII letters, digits and plain punctuation only (no
# format specifiers, markup, mnemonics, paths, options or symbols that would be spelt out).
_ENGLISH_CHARS = re.compile(r"[A-Za-z0-9 ,.;:!?'\"()-]+")
# What disqualifies a translation: format specifiers, markup and entities, mnemonics, paths,
# URLs and options, and symbols that no speaker would say.
_BAD_TRANSLATION = re.compile(r"[%{}$<>&_/\\|*=#@\[\]~^`]|--")
# "Save as...", "Name:" : menu and label punctuation that is not part of the sentence.
_TRAILING = re.compile(r"(?:\s*(?::|\.\.\.|\u2026))+$")
_CONTROL = re.compile(r"[\n\r\t\x00-\x1f]")


def clean_message(text: str) -> str:
    """Collapse whitespace (no-break spaces too) and drop trailing colons and ellipses."""
    return _TRAILING.sub("", " ".join(text.split())).strip()


def is_sentence(english: str, *, sentences_only: bool = True) -> bool:
    """Whether a cleaned English message is sentence-like enough to be spoken and translated.

    3-20 words of ASCII letters, digits and plain punctuation, starting with a letter, no
    command-line options or ALL CAPS; with ``sentences_only`` it must also start with a capital
    and end with ``.``, ``?`` or ``!`` (full sentences rather than labels and fragments)."""
    if not _ENGLISH_CHARS.fullmatch(english) or "--" in english or not english[0].isalpha():
        return False
    words = english.split()
    if not MIN_WORDS <= len(words) <= MAX_WORDS or any(w.startswith("-") for w in words):
        return False
    letters = [c for c in english if c.isalpha()]
    if all(c.isupper() for c in letters):
        return False
    return not sentences_only or (english[0].isupper() and english[-1] in ".?!")


def is_clean_translation(translation: str, english: str) -> bool:
    """A usable target: letters, none of the markup/format/mnemonic characters, not the English
    left untranslated."""
    return (
        any(c.isalpha() for c in translation)
        and not _BAD_TRANSLATION.search(translation)
        and translation.casefold() != english.casefold()
    )


def _read_catalog(path: Path) -> dict[str, str]:
    """msgid -> msgstr of one .mo file (context stripped; plural entries and header skipped)."""
    with open(path, "rb") as fh:
        catalog = gettext.GNUTranslations(fh)._catalog  # type: ignore[attr-defined]
    messages: dict[str, str] = {}
    for msgid, msgstr in catalog.items():
        if isinstance(msgid, tuple) or not msgid or not isinstance(msgstr, str):
            continue  # plural forms and the header
        msgid = msgid.rsplit("\x04", 1)[-1]  # "context\x04message"
        messages[msgid] = msgstr
    return messages


def _language_candidates(
    lang: str, locale_dir: Path, sentences_only: bool
) -> dict[str, Counter[str]]:
    """Cleaned English sentence -> how often each clean translation occurs across catalogs."""
    folder = locale_dir / lang / "LC_MESSAGES"
    files = sorted(folder.glob("*.mo"))
    if not files:
        raise FileNotFoundError(f"gettext_pairs: no .mo catalogs in {folder}")
    found: dict[str, Counter[str]] = defaultdict(Counter)
    for path in files:
        try:
            messages = _read_catalog(path)
        except (OSError, UnicodeDecodeError, ValueError) as exn:  # bad charset or corrupt file
            log.warning("gettext_pairs: skipping unreadable catalog %s: %s", path, exn)
            continue
        for msgid, msgstr in messages.items():
            if _CONTROL.search(msgid) or _CONTROL.search(msgstr):
                continue
            english = clean_message(msgid)
            if not english or not is_sentence(english, sentences_only=sentences_only):
                continue
            translation = clean_message(msgstr)
            if translation and is_clean_translation(translation, english):
                found[english][translation] += 1
    return found


def gettext_pairs(
    langs: tuple[str, ...] | list[str] = ("de", "fr"),
    locale_dir: str | Path = LOCALE_DIR,
    *,
    sentences_only: bool = True,
) -> list[dict[str, str]]:
    """English sentences with a translation into every language of ``langs``, from gettext.

    Returns ``[{"en": ..., "de": ..., "fr": ...}, ...]`` sorted by the English. Every
    ``<locale_dir>/<lang>/LC_MESSAGES/*.mo`` is read (unreadable catalogs are logged and
    skipped); messages are cleaned (whitespace, trailing colon or ellipsis) and filtered with
    :func:`is_sentence` and :func:`is_clean_translation`. An English message translated
    differently in several catalogs gets its most common translation, ties broken
    alphabetically, so the result is the same on every run. ``sentences_only=False`` also keeps
    labels and fragments ("delete the reference"), several times as many.
    """
    langs = tuple(langs)
    if not langs or SOURCE_LANG in langs or len(set(langs)) != len(langs):
        raise ValueError(f"gettext_pairs: langs must be distinct non-English codes, got {langs}")
    root = Path(locale_dir)
    per_lang = {lang: _language_candidates(lang, root, sentences_only) for lang in langs}
    common = set.intersection(*(set(found) for found in per_lang.values()))
    pairs = []
    for english in sorted(common):
        pair = {SOURCE_LANG: english}
        for lang, found in per_lang.items():
            pair[lang] = min(found[english].items(), key=lambda kv: (-kv[1], kv[0]))[0]
        pairs.append(pair)
    return pairs


def _sentence_pools(n: int, counts: dict[str, int]) -> dict[str, int]:
    """How many distinct sentences val and test get (train keeps the rest, at least half)."""
    needed = sum(1 for c in counts.values() if c > 0)
    if n < needed:
        raise ValueError(f"need at least {needed} sentence pairs for these splits, got {n}")
    n_val, n_test = counts["val"], counts["test"]
    cap = n - (max(1, n // 2) if counts["train"] else 0)
    if n_val + n_test > cap:  # share the eval sentences in proportion; reuse them with voices
        n_val, n_test = (
            min(c, max(1, c * cap // (counts["val"] + counts["test"]))) for c in (n_val, n_test)
        )
        if n_val + n_test > cap:
            n_test = cap - n_val
    return {"val": n_val, "test": n_test}


def _plan_st(
    pairs: list[dict[str, str]],
    counts: dict[str, int],
    seed: int,
    held_out_voices: int,
    voices: tuple[str, ...] | list[str],
) -> tuple[list[_Utterance], dict[str, dict[str, str]], list[str], list[str]]:
    """Utterances, key -> pair, training and held-out voices; the sentence split is by sentence
    and every random draw comes from one generator seeded by ``seed``."""
    rng = random.Random(seed)
    train_voices, held_out = split_voices(rng, voices, held_out_voices)
    order = list(range(len(pairs)))
    rng.shuffle(order)
    sizes = _sentence_pools(len(pairs), counts)
    pools = {
        "val": order[: sizes["val"]],
        "test": order[sizes["val"] : sizes["val"] + sizes["test"]],
        "train": order[sizes["val"] + sizes["test"] :],
    }
    utterances: list[_Utterance] = []
    chosen: dict[str, dict[str, str]] = {}
    used: dict[int, set[str]] = defaultdict(set)  # sentence -> voices that already spoke it
    for split in ("train", "val", "test"):
        voice_pool = held_out if split == "test" else train_voices
        sentences = pools[split]
        for i in range(counts[split]):
            index = sentences[i % len(sentences)]
            fresh = [v for v in voice_pool if v not in used[index]]
            voice = rng.choice(fresh or voice_pool)
            used[index].add(voice)
            speed, pitch = draw_prosody(rng)
            key = f"{split}-{i:06d}"
            pair = pairs[index]
            utterances.append(_Utterance(key, split, pair[SOURCE_LANG], voice, speed, pitch))
            chosen[key] = pair
    return utterances, chosen, train_voices, held_out


def synthesize_st(
    out_dir: str | Path,
    *,
    n_train: int,
    n_val: int,
    n_test: int,
    langs: tuple[str, ...] | list[str] = ("de", "fr"),
    seed: int = 0,
    held_out_voices: int = 8,
    jobs: int = 2,
    locale_dir: str | Path = LOCALE_DIR,
) -> dict[str, Path]:
    """Synthesise an English->``langs`` speech-translation corpus; returns split -> manifest.

    Sentence pairs come from :func:`gettext_pairs` (``locale_dir``). val and test sentences
    never occur in train (each gets ``n_val``/``n_test`` distinct sentences when the pool
    allows, train keeps at least half); test uses ``held_out_voices`` voices never heard in
    training. The same seed gives the same manifests on the same espeak-ng and catalogs.
    """
    counts = {"train": n_train, "val": n_val, "test": n_test}
    if any(n < 0 for n in counts.values()):
        raise ValueError(f"utterance counts must be non-negative, got {counts}")
    check_tools()
    langs = tuple(langs)
    pairs = gettext_pairs(langs, locale_dir)
    log.info("synthesize_st: %d sentence pairs en -> %s", len(pairs), ",".join(langs))
    utterances, chosen, train_voices, held_out = _plan_st(
        pairs, counts, seed, held_out_voices, english_voices()
    )
    out = Path(out_dir)
    for split in counts:
        (out / split).mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        list(pool.map(lambda u: _synthesize_one(u, out), utterances))  # re-raises a failure

    def line(u: _Utterance) -> dict:
        pair = chosen[u.key]
        return {
            "audio": u.audio,
            "text": u.text,
            "translation": {lang: pair[lang] for lang in langs},
            "source_lang": SOURCE_LANG,
            "key": u.key,
            "voice": u.voice,
            "speed": u.speed,
            "pitch": u.pitch,
            "task": "asr",
        }

    return _write_manifests(out, utterances, train_voices, held_out, line)
