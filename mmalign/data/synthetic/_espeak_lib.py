"""libespeak-ng through ctypes: audio plus phoneme events from one synthesis run.

The espeak-ng command line prints no phoneme timings without mbrola voices, but the library
reports a phoneme event (espeak mnemonic and sample index) for every phoneme it speaks. The
library keeps state between calls (voice, wave generator phase), so the same utterance
synthesised twice in one process can differ by a few samples; a fresh process gives the same
samples every time, identical to ``espeak-ng -w``. :mod:`mmalign.data.synthetic.lips` therefore
runs this file as a script (standard library only, so it starts fast), one process per
utterance::

    python -I -S _espeak_lib.py LIBRARY VOICE SPEED PITCH < text

which writes to stdout a line ``RATE N_SAMPLES N_EVENTS``, one line ``SAMPLE MNEMONIC`` per
phoneme event, then the raw native-endian 16-bit mono samples. It imports only ``ctypes`` and
``sys`` (json, re and ctypes.util would double its start-up time).
"""

from __future__ import annotations

import ctypes
import sys

_AUDIO_OUTPUT_SYNCHRONOUS = 2
_INITIALIZE_PHONEME_EVENTS = 1
_EVENT_LIST_TERMINATED = 0
_EVENT_PHONEME = 7
_RATE, _PITCH = 1, 3
_POS_CHARACTER = 1
# espeakCHARS_UTF8 | espeakENDPAUSE (a pause at the end), as the espeak-ng command line does
_SYNTH_FLAGS = 0x1 | 0x1000


class _EventId(ctypes.Union):
    _fields_ = [("number", ctypes.c_int), ("name", ctypes.c_char_p), ("string", ctypes.c_char * 8)]


class _Event(ctypes.Structure):
    _fields_ = [
        ("type", ctypes.c_int),
        ("unique_identifier", ctypes.c_uint),
        ("text_position", ctypes.c_int),
        ("length", ctypes.c_int),
        ("audio_position", ctypes.c_int),
        ("sample", ctypes.c_int),
        ("user_data", ctypes.c_void_p),
        ("id", _EventId),
    ]


class _Voice(ctypes.Structure):
    _fields_ = [
        ("name", ctypes.c_char_p),
        ("languages", ctypes.c_char_p),
        ("identifier", ctypes.c_char_p),
        ("gender", ctypes.c_ubyte),
        ("age", ctypes.c_ubyte),
        ("variant", ctypes.c_ubyte),
        ("xx1", ctypes.c_ubyte),
        ("score", ctypes.c_int),
        ("spare", ctypes.c_void_p),
    ]


_Callback = ctypes.CFUNCTYPE(
    ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.POINTER(_Event)
)


def synthesize(
    library: str, text: str, voice: str, speed: int, pitch: int
) -> tuple[int, bytes, list[tuple[int, str]]]:
    """(sample rate, int16 samples as bytes, [(start sample, mnemonic), ...]) of one utterance.

    Call once per process (see the module docstring)."""
    lib = ctypes.CDLL(library)
    lib.espeak_Initialize.restype = ctypes.c_int
    lib.espeak_Synth.argtypes = [
        ctypes.c_char_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int, ctypes.c_uint,
        ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p,
    ]  # fmt: skip
    rate = lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 0, None, _INITIALIZE_PHONEME_EVENTS)
    if rate <= 0:
        raise RuntimeError(f"espeak_Initialize failed ({rate})")
    samples = bytearray()
    events: list[tuple[int, str]] = []

    def collect(wav, n, event):  # noqa: ANN001 - ctypes callback
        if n > 0 and wav:
            samples.extend(ctypes.string_at(wav, 2 * n))
        i = 0
        while event[i].type != _EVENT_LIST_TERMINATED:
            if event[i].type == _EVENT_PHONEME:
                name = bytes(event[i].id.string).rstrip(b"\0").decode("ascii", "replace")
                events.append((event[i].sample, name))
            i += 1
        return 0

    callback = _Callback(collect)  # referenced until the end of synthesis
    lib.espeak_SetSynthCallback(callback)
    # as the command line does: a voice name (with +variant), else a language
    if lib.espeak_SetVoiceByName(voice.encode()) != 0:
        selector = _Voice(languages=voice.encode())
        if lib.espeak_SetVoiceByProperties(ctypes.byref(selector)) != 0:
            raise RuntimeError(f"espeak-ng has no voice {voice!r}")
    lib.espeak_SetParameter(_RATE, int(speed), 0)
    lib.espeak_SetParameter(_PITCH, int(pitch), 0)
    data = text.encode("utf-8")
    status = lib.espeak_Synth(data, len(data) + 1, 0, _POS_CHARACTER, 0, _SYNTH_FLAGS, None, None)
    lib.espeak_Synchronize()
    if status != 0:
        raise RuntimeError(f"espeak_Synth failed ({status})")
    return rate, bytes(samples), events


def main(argv: list[str]) -> int:
    """Script entry: see the module docstring."""
    library, voice, speed, pitch = argv
    text = sys.stdin.buffer.read().decode("utf-8")
    try:
        rate, samples, events = synthesize(library, text, voice, int(speed), int(pitch))
    except (OSError, RuntimeError) as exn:
        print(f"libespeak-ng: {exn}", file=sys.stderr)
        return 2
    lines = [f"{rate} {len(samples) // 2} {len(events)}"]
    lines += [f"{sample} {name}" for sample, name in events]
    sys.stdout.buffer.write("\n".join(lines).encode() + b"\n" + samples)
    sys.stdout.buffer.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
