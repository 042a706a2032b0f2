"""Training in stages (a curriculum), each stage starting from the one before, as WavLLM trains:
e.g. stage 1 ASR only, stage 2 ASR + translation with the same LoRA (or a fresh one).

A curriculum file names one ``mmalign fit`` config that every stage shares and, per stage, the
settings it changes (dotted keys, as on the command line)::

    # mmalign curriculum configs/demo/st_curriculum.yaml
    fit_config: configs/demo/st_whisper-tiny_smollm2-135m.yaml
    out_dir: runs/st_demo/curriculum
    stages:
      - name: asr
        overrides: {trainer.max_steps: 150, data.train: runs/st_demo/shards/train}
      - name: multitask
        init_adapter: continue          # or fresh: a new LoRA, projector carried over
        overrides: {trainer.max_steps: 150, data.train: [{shards: ..., task: st, target_lang: de}]}

Stage ``k`` trains in ``out_dir/<k>-<name>`` (its checkpoints in ``checkpoints/`` there) and, from
the second on, starts from the previous stage's ``last.ckpt`` (``model.init_from``: trained
weights only; optimizer, schedule and step count start afresh). A finished stage leaves
``done.json``; running the curriculum again skips finished stages and resumes an unfinished one
from its own ``last.ckpt`` (exactly, through Lightning's ``ckpt_path``), so a killed run loses
at most the work since its last checkpoint.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

DONE = "done.json"


@dataclass
class Stage:
    name: str
    overrides: dict[str, Any] = field(default_factory=dict)
    init_adapter: str = "continue"


@dataclass
class Curriculum:
    fit_config: Path
    out_dir: Path
    stages: list[Stage]

    @classmethod
    def load(cls, path: str | Path) -> Curriculum:
        """Read and check a curriculum file; errors name the file and the field."""
        path = Path(path)
        raw = yaml.safe_load(path.read_text())
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: not a mapping")
        missing = [k for k in ("fit_config", "out_dir", "stages") if k not in raw]
        if missing:
            raise ValueError(f"{path}: missing {missing}")
        fit_config = Path(raw["fit_config"])
        if not fit_config.is_file():
            raise FileNotFoundError(f"{path}: fit_config {fit_config} not found")
        stages = []
        for i, st in enumerate(raw["stages"] or []):
            if not isinstance(st, dict) or "name" not in st:
                raise ValueError(f"{path}: stages[{i}] needs a name")
            unknown = set(st) - {"name", "overrides", "init_adapter"}
            if unknown:
                raise ValueError(f"{path}: stages[{i}] has unknown field(s) {sorted(unknown)}")
            if st.get("init_adapter", "continue") not in ("continue", "fresh"):
                raise ValueError(f"{path}: stages[{i}].init_adapter must be continue or fresh")
            stages.append(Stage(str(st["name"]), dict(st.get("overrides") or {}),
                                st.get("init_adapter", "continue")))  # fmt: skip
        if not stages:
            raise ValueError(f"{path}: no stages")
        names = [s.name for s in stages]
        if len(set(names)) != len(names):
            raise ValueError(f"{path}: stage names repeat: {names}")
        return cls(fit_config, Path(raw["out_dir"]), stages)

    def stage_dir(self, k: int) -> Path:
        return self.out_dir / f"{k}-{self.stages[k].name}"


def _args(overrides: dict[str, Any]) -> list[str]:
    """``--key=value`` arguments: strings as they are, other values as JSON (which jsonargparse
    reads for numbers, lists and mappings)."""
    return [f"--{k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in overrides.items()]


def run_stage(cur: Curriculum, k: int) -> Path:
    """Train stage ``k`` (or resume it); returns its final checkpoint."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from mmalign.lightning_modules.cli import run_cli

    stage, out = cur.stages[k], cur.stage_dir(k)
    ckpt_dir = out / "checkpoints"
    args = ["--config", str(cur.fit_config), *_args(stage.overrides)]
    args += [f"--trainer.default_root_dir={out}"]
    if k > 0:
        previous = json.loads((cur.stage_dir(k - 1) / DONE).read_text())["checkpoint"]
        args += [f"--model.init_from={previous}", f"--model.init_adapter={stage.init_adapter}"]
    cli = run_cli(args, run=False)
    trainer = cli.trainer
    checkpoints = [cb for cb in trainer.callbacks if isinstance(cb, ModelCheckpoint)]
    if not checkpoints:
        raise ValueError(f"{cur.fit_config}: add a ModelCheckpoint callback with save_last: true")
    for cb in checkpoints:  # every stage writes into its own folder
        cb.dirpath = str(ckpt_dir)
        cb.save_last = True
    last = ckpt_dir / "last.ckpt"
    resume = str(last) if last.is_file() else None
    print(f"curriculum stage {k} ({stage.name}): {'resuming ' + resume if resume else 'start'}")
    trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=resume)
    if not last.is_file():
        raise RuntimeError(f"stage {stage.name} left no {last}")
    (out / DONE).write_text(
        json.dumps({"checkpoint": str(last), "steps": trainer.global_step}, indent=2)
    )
    return last


def run_curriculum(path: str | Path) -> list[Path]:
    """Run every stage not yet done; returns each stage's final checkpoint."""
    cur = Curriculum.load(path)
    finals = []
    for k in range(len(cur.stages)):
        done = cur.stage_dir(k) / DONE
        if done.is_file():
            print(f"curriculum stage {k} ({cur.stages[k].name}): done, skipped")
            finals.append(Path(json.loads(done.read_text())["checkpoint"]))
            continue
        finals.append(run_stage(cur, k))
    return finals
