"""Every YAML in configs/ opens with its command and parses against the real classes."""

from pathlib import Path

import pytest

from mmalign.cli import cli_main

CONFIGS = sorted(Path(__file__).parents[1].joinpath("configs").rglob("*.yaml"))


def test_there_are_configs():
    assert len(CONFIGS) >= 2


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(p.parents[1])))
def test_config_parses(path, capsys):
    first = path.read_text().splitlines()[0]
    assert first.startswith("# ") and ("mmalign " in first or "make " in first), first
    # --print_config resolves every class_path and checks init_args without loading weights
    with pytest.raises(SystemExit) as e:
        cli_main(["fit", "--config", str(path), "--print_config"])
    assert e.value.code in (0, None)
    assert "class_path" in capsys.readouterr().out
