"""Set-up check: the compiled pieces load beside the installed torch; the pinned weights are there.

torchaudio, torchvision and torchcodec are C++ extensions compiled against one torch release; pip
will happily install a newer one beside an older torch (torchaudio 2.11.1 beside torch 2.11.0
fails with ``undefined symbol``), and the failure surfaces as dozens of import errors mid-suite.
``python -m mmalign.stack`` (run at the end of ``make setup``) loads each piece once and names the
package and versions when one does not fit, so a bad install stops at set-up.
"""

from __future__ import annotations

import importlib.metadata
import sys
from collections.abc import Callable

__all__ = ["StackError", "check_stack"]


class StackError(RuntimeError):
    """A compiled package does not load beside the installed torch, or a pinned asset is missing."""


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _torchaudio() -> None:
    import torch
    import torchaudio.functional as F

    F.lfilter(torch.zeros(8), torch.tensor([1.0, 0.0]), torch.tensor([1.0, 0.0]))


def _torchvision() -> None:
    import torch
    from torchvision.ops import nms  # a compiled operator: fails when built for another torch

    nms(torch.tensor([[0.0, 0.0, 1.0, 1.0]]), torch.tensor([1.0]), 0.5)


def _torchcodec() -> None:
    from torchcodec.decoders import AudioDecoder  # loads libtorchcodec and the system's FFmpeg

    del AudioDecoder


def _pinned_weights() -> None:
    from mmalign.assets import PINNED, resolve

    for name in PINNED:
        resolve(f"pinned:{name}")


CHECKS: dict[str, Callable[[], None]] = {
    "torchaudio": _torchaudio,
    "torchvision": _torchvision,
    "torchcodec": _torchcodec,
    "pinned weights": _pinned_weights,
}


def check_stack() -> list[str]:
    """Run every check; return one line per piece; raise naming each one that fails."""
    import torch

    lines, problems = [], []
    for name, check in CHECKS.items():
        label = name if name == "pinned weights" else f"{name} {_version(name)}"
        try:
            check()
        except Exception as err:  # noqa: BLE001 -- every failure is reported, with its type
            where = f"{label} beside torch {torch.__version__}" if label != name else label
            cause = f" ({err.__cause__})" if err.__cause__ else ""  # e.g. the undefined symbol
            detail = "\n    ".join(f"{err}{cause}".strip().splitlines()[:6])  # not 80 lines
            problems.append(f"{where}: {type(err).__name__}: {detail}")
        else:
            lines.append(f"{label}: ok")
    if problems:
        raise StackError(
            "the installed stack does not fit together:\n  "
            + "\n  ".join(problems)
            + "\nThe torch family (torch, torchaudio, torchvision, torchcodec) must come from one "
            "release: reinstall from requirements.lock (`rm -rf .venv && make setup`)."
        )
    return [f"torch {torch.__version__}: ok", *lines]


def main() -> int:
    try:
        lines = check_stack()
    except StackError as err:
        print(f"mmalign stack check failed: {err}", file=sys.stderr)
        return 1
    print("mmalign stack: " + "; ".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
