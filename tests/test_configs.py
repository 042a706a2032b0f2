"""Every YAML in configs/ opens with its command and parses against the real classes.

``configs/scale/`` holds trainer fragments (strategy, devices, precision) that compose with any
model config: each is parsed as its own first line runs it (``--config <model> --config
<fragment>``) and together with every model config.
"""

from pathlib import Path

import pytest
import yaml

from mmalign.cli import cli_main

REPO = Path(__file__).parents[1]
CONFIGS = sorted(REPO.joinpath("configs").rglob("*.yaml"))
FRAGMENTS = [p for p in CONFIGS if p.parent.name == "scale"]
MODELS = [
    p for p in CONFIGS if p not in FRAGMENTS and "fit_config" not in yaml.safe_load(p.read_text())
]
# one model config of each folder (asr, avsr, vsr, demo...): every fragment is composed with each
ONE_PER_FOLDER = [
    next(p for p in MODELS if p.parent == d) for d in sorted({p.parent for p in MODELS})
]


def _id(path: Path) -> str:
    return str(path.relative_to(path.parents[1]))


def command_configs(path: Path) -> list[Path]:
    """The ``--config`` files that ``path``'s first line (its command) gives, in order, when
    ``path`` is one of them (a fragment with its model config); else ``path`` alone."""
    words = path.read_text().splitlines()[0].split()
    named = [REPO / w for prev, w in zip(words, words[1:], strict=False) if prev == "--config"]
    return named if path in named else [path]


def print_config(configs: list[Path], capsys) -> dict:
    """``fit --print_config`` of ``configs``: resolves every class_path and checks init_args
    without loading weights; returns the composed config."""
    args = ["fit"]
    for c in configs:
        args += ["--config", str(c)]
    with pytest.raises(SystemExit) as e:
        cli_main([*args, "--print_config"])
    assert e.value.code in (0, None)
    out = capsys.readouterr().out
    assert "class_path" in out
    return yaml.safe_load(out)


def test_there_are_configs():
    assert len(CONFIGS) >= 2
    assert {p.stem for p in FRAGMENTS} >= {
        "ddp_1node",
        "ddp_multinode",
        "fsdp_1node",
        "fsdp_multinode",
        "deepspeed_stage2",
    }


@pytest.mark.parametrize("path", CONFIGS, ids=_id)
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
    configs = command_configs(path)
    if path in FRAGMENTS:  # its command names a model config before it
        assert len(configs) >= 2 and configs[-1] == path, first
        assert all(c.is_file() and c not in FRAGMENTS for c in configs[:-1]), first
    print_config(configs, capsys)


@pytest.mark.parametrize("fragment", FRAGMENTS, ids=_id)
def test_scale_fragment_is_trainer_only(fragment):
    """A fragment sets trainer options only, so it cannot clash with a model config."""
    assert set(yaml.safe_load(fragment.read_text())) == {"trainer"}


@pytest.mark.parametrize("model", ONE_PER_FOLDER, ids=_id)
@pytest.mark.parametrize("fragment", FRAGMENTS, ids=_id)
def test_scale_fragment_composes_with_model_config(fragment, model, capsys):
    composed = print_config([model, fragment], capsys)
    for key, value in yaml.safe_load(fragment.read_text())["trainer"].items():
        got = composed["trainer"][key]
        if isinstance(value, dict):  # a strategy class: its settings are all kept
            assert got["class_path"] == value["class_path"]
            assert value["init_args"].items() <= got["init_args"].items(), (key, got)
        else:
            assert got == value, (key, got, value)
    model_llm = yaml.safe_load(model.read_text())["model"]["llm"]
    assert composed["model"]["llm"]["class_path"] == model_llm["class_path"]
    assert composed["model"]["llm"]["init_args"]["source"] == model_llm["init_args"]["source"]
