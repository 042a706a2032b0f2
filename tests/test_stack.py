"""The set-up check: passes on the locked stack, names package and versions when a piece fails."""

from __future__ import annotations

import pytest

from mmalign import stack


def test_locked_stack_loads() -> None:
    lines = stack.check_stack()
    assert [line.split()[0] for line in lines] == [
        "torch",
        "torchaudio",
        "torchvision",
        "torchcodec",
        "pinned",
    ]


def test_mismatch_names_package_versions_and_cause(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken() -> None:
        try:
            raise OSError("libtorchaudio.so: undefined symbol: torch_exception_get_what")
        except OSError as err:
            raise OSError("Could not load this library: libtorchaudio.so") from err

    monkeypatch.setitem(stack.CHECKS, "torchaudio", broken)
    with pytest.raises(stack.StackError) as info:
        stack.check_stack()
    message = str(info.value)
    version = stack._version("torchaudio")
    assert f"torchaudio {version} beside torch " in message
    assert "undefined symbol" in message  # the chained cause, which says what is wrong
    assert "torchvision" not in message.split("\n")[1]  # only the failing piece is blamed
    assert stack.main() == 1
