"""Every YAML in configs/ opens with its command and parses against the real classes."""

from pathlib import Path

import pytest
import yaml

from mmalign.cli import cli_main

CONFIGS = sorted(Path(__file__).parents[1].joinpath("configs").rglob("*.yaml"))


def test_there_are_configs():
    assert len(CONFIGS) >= 2


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(p.parents[1])))
def test_config_parses(path, capsys, monkeypatch):
    first = path.read_text().splitlines()[0]
    assert first.startswith("# ") and ("mmalign " in first or "make " in first), first
    if "fit_config" in yaml.safe_load(path.read_text()):  # a curriculum: stages of a fit config
        from mmalign.lightning_modules.curriculum import Curriculum

        monkeypatch.chdir(path.parents[2])
        cur = Curriculum.load(path)
        assert cur.stages and str(cur.fit_config) in [
            str(p.relative_to(path.parents[2])) for p in CONFIGS
        ]
        return
    # --print_config resolves every class_path and checks init_args without loading weights
    with pytest.raises(SystemExit) as e:
        cli_main(["fit", "--config", str(path), "--print_config"])
    assert e.value.code in (0, None)
    assert "class_path" in capsys.readouterr().out
