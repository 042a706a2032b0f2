"""Offline audio-visual demo corpus: espeak-ng speech plus a rendered mouth video per utterance.

No lip-reading video can be downloaded here, yet the AVSR/VSR demos and end-to-end tests need
clips whose frames follow the words. This corpus is **synthetic**: the video shows no real
face, only a cartoon mouth drawn with numpy, whose shape follows the phoneme timings that
espeak-ng itself reports while it speaks the utterance.

How a clip is made:

* audio and phoneme events come from one libespeak-ng run (one process per utterance, see
  :mod:`mmalign.data.synthetic._espeak_lib`): 22050 Hz samples, identical to ``espeak-ng -w``,
  and the start sample of every phoneme (espeak mnemonics such as ``T``, ``r``, ``i:``);
  sox converts the samples to 16 kHz mono 16-bit, normalised to -1 dBFS, as
  :mod:`mmalign.data.synthetic.espeak` does;
* each phoneme maps to one viseme (two or three for diphthongs), one of 14 mouth shapes given by
  opening, width, lip rounding, teeth and tongue visibility (:data:`VISEMES`). Shapes are
  targets held over the middle third of the phoneme, cosine-interpolated between targets, with
  a closed neutral mouth during pauses, and sampled at the frame centres ``(i + 0.5) / fps``;
* each frame is a ``size x size`` grayscale mouth region: skin, an elliptic pair of lips, a dark
  interior when open, a bright teeth band, a grey tongue, anti-aliased edges and a little
  seeded pixel noise. Mouth size, lip thickness, brightness and position vary per voice.

What the video carries: which viseme is being spoken when, with the timing of the audio. Like
real lip reading it is partial: phonemes that share a viseme look identical (``p``/``b``/``m``,
``t``/``d``/``n``/``l``, ``k``/``g``, voiced and unvoiced pairs), ``h`` and glottal stops are
invisible, and short consonants between frames are only partly seen. Beyond the pixel noise it
holds no noise, occlusion, head motion or lighting change, so models trained on it learn the
pipeline, not lip reading of real faces.

Layout (under ``out_dir``): ``<split>/<key>.wav``, ``<split>/<key>.npy`` (``np.save`` of a uint8
``[T, size, size]`` array, ``T = round(seconds * fps)``), one manifest per split
(``<split>.jsonl``, lines ``{"audio", "video", "video_fps", "text", "key", "voice", "speed",
"pitch", "task": "avsr", "synthetic": true}``, paths relative to ``out_dir``) and
``voices.json``; splits and held-out voices as in :func:`mmalign.data.synthetic.espeak.synthesize`.
The same seed gives identical manifests and identical ``.npy`` bytes, whatever ``jobs`` is.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import subprocess
import sys
import wave
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import NamedTuple

import numpy as np

from mmalign.data.synthetic import _espeak_lib
from mmalign.data.synthetic.espeak import (
    MissingToolError,
    _check_args,
    _plan,
    _Utterance,
    _write_manifests,
    check_tools,
    sox_to_16k,
)

LIB_INSTALL_HINT = "sudo apt-get install espeak-ng libespeak-ng1 sox"
LIBRARY = "libespeak-ng.so.1"


class Viseme(NamedTuple):
    """A target mouth shape; every value lies in [0, 1]."""

    opening: float  # vertical gap between the lips
    width: float  # horizontal spread (0.5 neutral)
    rounding: float  # lip rounding and protrusion: narrower, thicker lips
    teeth: float  # how much of the upper teeth shows
    tongue: float  # how much of the tongue shows


VISEMES: dict[str, Viseme] = {
    "SIL": Viseme(0.00, 0.50, 0.15, 0.0, 0.0),  # rest, lips together
    "PBM": Viseme(0.00, 0.45, 0.00, 0.0, 0.0),  # lips pressed together
    "FV": Viseme(0.12, 0.50, 0.00, 1.0, 0.0),  # upper teeth on the lower lip
    "TH": Viseme(0.25, 0.55, 0.00, 0.8, 1.0),  # tongue between the teeth
    "ALV": Viseme(0.25, 0.55, 0.05, 0.6, 0.5),  # t d n l: tongue tip behind the teeth
    "SZ": Viseme(0.10, 0.72, 0.00, 1.0, 0.0),  # s z: teeth together, lips spread
    "SH": Viseme(0.25, 0.35, 0.70, 0.9, 0.0),  # sh zh ch j: protruded lips, teeth
    "KG": Viseme(0.35, 0.55, 0.05, 0.4, 0.3),  # k g ng: open, tongue at the back
    "R": Viseme(0.20, 0.35, 0.60, 0.3, 0.1),  # r: slightly rounded
    "OO": Viseme(0.18, 0.20, 1.00, 0.0, 0.0),  # w, u: small round opening
    "OH": Viseme(0.60, 0.35, 0.75, 0.2, 0.2),  # o, aw: rounded and open
    "AA": Viseme(1.00, 0.60, 0.00, 0.5, 0.4),  # a, ah, u in "cup": wide open
    "EH": Viseme(0.50, 0.65, 0.05, 0.5, 0.3),  # e, schwa, er: half open
    "EE": Viseme(0.25, 0.90, 0.00, 0.9, 0.1),  # i, y: spread, teeth showing
}

# espeak-ng English phoneme mnemonics -> visemes (several for diphthongs; none: invisible, the
# mouth moves on from its neighbours). Covers every mnemonic the en, en-us, en-gb-* and en-029
# voices emit for the digits and SENTENCES, plus close relatives.
PHONEME_VISEMES: dict[str, tuple[str, ...]] = {
    **dict.fromkeys(("_", "_:", "_!", "_|", "_^_", "_#", "_!_", "_;_", "_::"), ("SIL",)),
    **dict.fromkeys(("p", "b", "m", "m-"), ("PBM",)),
    **dict.fromkeys(("f", "v"), ("FV",)),
    **dict.fromkeys(("T", "D"), ("TH",)),
    **dict.fromkeys(
        ("t", "d", "n", "l", "t#", "t2", "t[", "d#", "d[", "n-", "l-", "l/", "L", "n[", "?T"),
        ("ALV",),
    ),
    **dict.fromkeys(("s", "z"), ("SZ",)),
    **dict.fromkeys(("S", "Z", "tS", "dZ"), ("SH",)),
    **dict.fromkeys(("k", "g", "N", "x", "k#", "g#"), ("KG",)),
    **dict.fromkeys(("r", "r-", "r/", "R", "*"), ("R",)),
    **dict.fromkeys(("w", "W", "w#", "u:", "U", "u", "U#", "u#"), ("OO",)),
    **dict.fromkeys(("j", ";", "i:", "i", "I", "I2", "I#", "i#"), ("EE",)),
    **dict.fromkeys(("0", "O:", "O", "O2", "O@", "o@", "o", "o:", "0#"), ("OH",)),
    **dict.fromkeys(("a", "a#", "aa", "A:", "A", "A@", "A#", "V", "a2"), ("AA",)),
    **dict.fromkeys(("e", "E", "E2", "e#", "@", "@2", "@5", "@-", "3", "3:", "e@"), ("EH",)),
    **dict.fromkeys(("h", "?", "h#"), ()),
    "@L": ("EH", "ALV"),
    "i@": ("EE", "EH"),
    "i@3": ("EE", "EH"),
    "IR": ("EE", "R"),
    "VR": ("AA", "R"),
    "3:r": ("EH", "R"),
    "U@": ("OO", "EH"),
    "aI": ("AA", "EE"),
    "aI2": ("AA", "EE"),
    "aI3": ("AA", "EE"),
    "aI@": ("AA", "EE", "EH"),
    "aI@3": ("AA", "EE", "EH"),
    "aU": ("AA", "OO"),
    "aU@": ("AA", "OO", "EH"),
    "eI": ("EH", "EE"),
    "oU": ("OH", "OO"),
    "oU#": ("OH", "OO"),
    "OI": ("OH", "EE"),
}

_VOWEL_CHARS = set("aeiouAEIOUV03@")


def phoneme_visemes(mnemonic: str) -> tuple[str, ...]:
    """Visemes of an espeak mnemonic; unknown ones are guessed (never raises).

    Unknown names drop trailing variant marks (``#``, digits ...), then fall back to a pause
    (``_...``), a half-open vowel or an alveolar consonant."""
    if mnemonic in PHONEME_VISEMES:
        return PHONEME_VISEMES[mnemonic]
    stripped = mnemonic.rstrip("0123456789#-[/;!")
    if stripped in PHONEME_VISEMES:
        return PHONEME_VISEMES[stripped]
    if not mnemonic or mnemonic.startswith("_"):
        return ("SIL",)
    return ("EH",) if _VOWEL_CHARS & set(mnemonic) else ("ALV",)


def mouth_track(
    events: Sequence[tuple[float, str]], duration: float, fps: float = 25.0
) -> np.ndarray:
    """Mouth parameters per video frame, ``[T, 5]`` float32 in :class:`Viseme` order.

    ``events`` are (start second, espeak mnemonic) in time order; a phoneme lasts until the next
    one starts (the last until ``duration``). ``T = round(duration * fps)`` (at least 1), frame
    ``i`` sampled at ``(i + 0.5) / fps``."""
    n_frames = max(1, int(round(duration * fps)))
    times, shapes = [0.0], [VISEMES["SIL"]]
    starts = [float(t) for t, _ in events]
    ends = starts[1:] + [max(duration, starts[-1])] if starts else []
    for (start, name), end in zip(events, ends, strict=True):
        visemes = phoneme_visemes(name)
        length = max(end - start, 0.0)
        if visemes == ("SIL",):  # closed during the pause, moving only near its edges
            edge = min(0.04, length / 3)
            points = [(start + edge, "SIL"), (end - edge, "SIL")]
        elif len(visemes) == 1:  # held over the middle third
            points = [(start + length / 3, visemes[0]), (start + 2 * length / 3, visemes[0])]
        else:  # diphthongs glide through their parts
            n = len(visemes)
            points = [(start + length * (j + 0.5) / n, v) for j, v in enumerate(visemes)]
        for t, v in points:
            times.append(t)
            shapes.append(VISEMES[v])
    times.append(max(duration, times[-1]))
    shapes.append(VISEMES["SIL"])

    knots = np.maximum.accumulate(np.asarray(times, dtype=np.float64))
    values = np.asarray(shapes, dtype=np.float64)
    t = (np.arange(n_frames, dtype=np.float64) + 0.5) / fps
    idx = np.clip(np.searchsorted(knots, t, side="right") - 1, 0, len(knots) - 2)
    gap = knots[idx + 1] - knots[idx]
    u = np.clip((t - knots[idx]) / np.where(gap > 0, gap, 1.0), 0.0, 1.0)
    u = np.where(gap > 0, u, 1.0)
    w = ((1.0 - np.cos(np.pi * u)) / 2.0)[:, None]  # cosine ease between targets
    return (values[idx] * (1.0 - w) + values[idx + 1] * w).astype(np.float32)


@dataclass(frozen=True)
class SpeakerStyle:
    """Per-voice look of the mouth (derived from the voice name, so stable across runs)."""

    scale: float  # mouth size factor
    lip: float  # lip thickness, pixels at size 96
    skin: float  # grey levels
    lips: float
    inside: float
    teeth: float
    tongue: float
    dx: float  # mouth centre offset, pixels at size 96
    dy: float


def _stable_seed(*parts: object) -> int:
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little")


def speaker_style(voice: str) -> SpeakerStyle:
    """The mouth style of a voice: a hash of its name seeds every draw."""
    rng = np.random.default_rng(_stable_seed("lips-style", voice))
    skin = rng.uniform(140.0, 195.0)
    return SpeakerStyle(
        scale=float(rng.uniform(0.88, 1.12)),
        lip=float(rng.uniform(4.5, 7.0)),
        skin=float(skin),
        lips=float(skin - rng.uniform(30.0, 60.0)),
        inside=float(rng.uniform(20.0, 45.0)),
        teeth=float(rng.uniform(205.0, 240.0)),
        tongue=float(rng.uniform(95.0, 130.0)),
        dx=float(rng.uniform(-3.0, 3.0)),
        dy=float(rng.uniform(-3.0, 3.0)),
    )


def _ellipse_alpha(dx: np.ndarray, dy: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Coverage of an axis-aligned ellipse with ~1 px soft edges (first-order distance).

    Ellipses thinner than a pixel are drawn half a pixel high and faded by their thickness: the
    distance estimate fails for such slivers."""
    fade = np.clip(np.minimum(a, b) / 0.5, 0.0, 1.0)
    a = np.maximum(a, 0.5)
    b = np.maximum(b, 0.5)
    f = (dx / a) ** 2 + (dy / b) ** 2 - 1.0
    grad = 2.0 * np.sqrt((dx / (a * a)) ** 2 + (dy / (b * b)) ** 2) + 1e-6
    return np.clip(0.5 - f / grad, 0.0, 1.0) * fade


def render_mouth(
    track: np.ndarray,
    style: SpeakerStyle,
    size: int = 96,
    rng: np.random.Generator | None = None,
    noise: int = 2,
) -> np.ndarray:
    """Draw frames ``[T, size, size]`` uint8 from mouth parameters ``[T, 5]`` (see
    :func:`mouth_track`); ``rng`` adds uniform integer pixel noise in ``[-noise, noise]``.

    Only the box the mouth can reach is drawn per frame; the skin around it is shared."""
    p = np.asarray(track, dtype=np.float32).reshape(-1, 5, 1, 1)
    opening, width, rounding, teeth, tongue = (p[:, i] for i in range(5))
    s = np.float32(size / 96.0)
    k = s * np.float32(style.scale)
    half_width = k * (25.0 + 14.0 * (width - 0.5) - 6.0 * rounding)
    gap = k * 14.0 * opening  # half-height of the opening
    inner_width = np.maximum(half_width - k * (2.5 + 3.0 * rounding), 0.5)
    upper = gap + k * style.lip * (1.0 + 0.6 * rounding)
    lower = gap + k * style.lip * (1.2 + 0.6 * rounding)

    cx, cy = size / 2 + style.dx * float(s), size / 2 + style.dy * float(s)
    x0, x1 = _span(cx, float(half_width.max()), float(half_width.max()), size)
    y0, y1 = _span(cy, float(upper.max()), float(lower.max()), size)
    centres = np.arange(size, dtype=np.float32) + 0.5
    dx = (centres[x0:x1] - np.float32(cx))[None, None, :]  # [1, 1, w]
    dy = (centres[y0:y1] - np.float32(cy))[None, :, None]  # [1, h, 1]

    lips = _ellipse_alpha(dx, dy, half_width, np.where(dy < 0, upper, lower))
    inside = _ellipse_alpha(dx, dy, inner_width, gap)
    # where the lips meet, a dark line; it widens into the opening
    seam = 0.5 * np.clip(1.0 - np.abs(dy) / s, 0.0, 1.0)
    seam = seam * np.clip((inner_width - np.abs(dx)) / (1.5 * s), 0.0, 1.0)
    inside = np.maximum(inside, seam * lips)
    tongue_a = tongue * _ellipse_alpha(dx, dy - 0.45 * gap, 0.65 * inner_width, 0.6 * gap + 0.5)
    band = teeth * (0.7 * gap + k)  # teeth hang from the top of the opening
    teeth_a = np.minimum(2.0 * teeth, 1.0) * np.clip(band - gap - dy + 0.5, 0.0, 1.0)

    # skin slightly lighter above the mouth than below
    skin = np.float32(style.skin) * (1.0 - 0.08 * (centres - np.float32(cy)) / size)
    frames = np.empty((len(p), size, size), dtype=np.float32)
    frames[:] = skin[None, :, None]
    img = frames[:, y0:y1, x0:x1]
    img += lips * (np.float32(style.lips) - img)
    img += inside * (np.float32(style.inside) - img)
    img += inside * tongue_a * (np.float32(style.tongue) - img)
    img += inside * teeth_a * (np.float32(style.teeth) - img)
    out = np.rint(frames).astype(np.int16)
    if rng is not None and noise > 0:  # random bytes mod 2n+1: much faster than integers()
        levels = np.frombuffer(rng.bytes(out.size), dtype=np.uint8) % np.uint8(2 * noise + 1)
        out += levels.reshape(out.shape).astype(np.int16) - np.int16(noise)
    return np.clip(out, 0, 255).astype(np.uint8)


def _span(centre: float, before: float, after: float, size: int) -> tuple[int, int]:
    """Pixel range ``[start, stop)`` covering ``centre - before .. centre + after`` plus the
    soft edge, clipped to the frame."""
    start = int(np.floor(centre - before - 2.0))
    stop = int(np.ceil(centre + after + 2.0))
    return max(start, 0), min(max(stop, start + 1), size)


def find_library() -> str | None:
    """Name or path of a loadable libespeak-ng, or None."""
    for name in (LIBRARY, ctypes.util.find_library("espeak-ng")):
        if not name:
            continue
        try:
            ctypes.CDLL(name)
        except OSError:
            continue
        return name
    return None


@lru_cache(maxsize=1)
def espeak_library() -> str:
    """The loadable libespeak-ng; :class:`MissingToolError` with an install hint if none."""
    library = find_library()
    if library is None:
        raise MissingToolError(
            f"libespeak-ng cannot be loaded; the audio-visual corpus needs it for phoneme "
            f"timings. Install it with: {LIB_INSTALL_HINT}"
        )
    return library


def check_av_tools() -> None:
    """Raise :class:`MissingToolError` if espeak-ng, sox or libespeak-ng is missing."""
    check_tools()
    espeak_library()


def phoneme_events(
    text: str, voice: str, speed: int = 175, pitch: int = 50
) -> tuple[int, np.ndarray, list[tuple[float, str]]]:
    """(sample rate, int16 samples, [(start second, mnemonic), ...]) from one libespeak-ng run.

    Runs in a fresh process: the library keeps state between utterances (see
    :mod:`mmalign.data.synthetic._espeak_lib`), and a fresh one makes results repeatable."""
    cmd = [sys.executable, "-I", "-S", _espeak_lib.__file__, espeak_library(), voice]
    proc = subprocess.run([*cmd, str(speed), str(pitch)], input=text.encode(), capture_output=True)
    try:
        if proc.returncode != 0:
            raise ValueError(proc.stderr.decode(errors="replace").strip())
        head, rest = proc.stdout.split(b"\n", 1)
        rate, n_samples, n_events = map(int, head.split())
        lines = rest.split(b"\n", n_events)
        events = [
            (int(sample) / rate, name.decode()) for sample, name in map(bytes.split, lines[:-1])
        ]
        samples = np.frombuffer(lines[-1], dtype=np.int16)
        if len(samples) != n_samples or not n_samples or len(events) != n_events:
            raise ValueError(f"{len(samples)} samples and {len(events)} events: truncated")
    except ValueError as exn:
        raise RuntimeError(f"libespeak-ng failed for {voice!r}: {exn}") from exn
    return rate, samples, events


def _video_path(utt: _Utterance) -> str:
    return f"{utt.split}/{utt.key}.npy"


def _synthesize_av_one(utt: _Utterance, out: Path, seed: int, fps: float, size: int) -> None:
    rate, samples, events = phoneme_events(utt.text, utt.voice, utt.speed, utt.pitch)
    target = out / utt.audio
    raw_format = ["-t", "raw", "-r", str(rate), "-e", "signed-integer", "-b", "16", "-c", "1"]
    sox_to_16k([*raw_format, "-"], target, utt.key, stdin=samples.tobytes())
    with wave.open(str(target), "rb") as wav:
        duration = wav.getnframes() / wav.getframerate()
    track = mouth_track(events, duration, fps)
    rng = np.random.default_rng(_stable_seed("lips-noise", seed, utt.key))
    frames = render_mouth(track, speaker_style(utt.voice), size, rng)
    np.save(out / _video_path(utt), frames, allow_pickle=False)


def synthesize_av(
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
    fps: float = 25.0,
    size: int = 96,
    jobs: int = 2,
) -> dict[str, Path]:
    """Synthesise a train/val/test audio-visual corpus into ``out_dir``; returns split ->
    manifest path.

    Arguments as in :func:`mmalign.data.synthetic.espeak.synthesize` (same seed, same texts
    and voices); ``fps`` and ``size`` set the video's frame rate and frame side in pixels.
    ``jobs`` utterances are made at once (one espeak process, sox and rendering each)."""
    counts = _check_args(kind, n_train, n_val, n_test, min_digits, max_digits)
    if not (fps > 0 and size >= 16):
        raise ValueError(f"need fps > 0 and size >= 16, got fps={fps}, size={size}")
    check_av_tools()
    out = Path(out_dir)
    utterances, train_voices, held_out = _plan(
        kind, counts, seed, held_out_voices, min_digits, max_digits
    )
    for split in counts:
        (out / split).mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        # list() re-raises the first failure
        list(pool.map(lambda u: _synthesize_av_one(u, out, seed, fps, size), utterances))

    def line(u: _Utterance) -> dict:
        return {
            "audio": u.audio,
            "video": _video_path(u),
            "video_fps": float(fps),
            "text": u.text,
            "key": u.key,
            "voice": u.voice,
            "speed": u.speed,
            "pitch": u.pitch,
            "task": "avsr",
            "synthetic": True,
        }

    return _write_manifests(out, utterances, train_voices, held_out, line)
