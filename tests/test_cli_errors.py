"""Issue 19: a config error the user can fix ends ``mmalign fit`` at start-up, before any model
loads, with one line naming the field and its value; ``--debug`` or ``MMALIGN_DEBUG=1`` bring
the traceback back.

Most cases call :func:`mmalign.cli.main` in-process (what the console script runs) and rebuild
what Python prints for its ``SystemExit``; model loading is watched through the two loaders. The
hub's offline mode and the debug switches are read from the environment, so those run
``python -m mmalign`` in a subprocess.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import lightning.pytorch  # noqa: F401  (its log handler binds stderr now, not a test's capsys)
import pytest
import yaml
from conftest import write_config

from mmalign.cli import main
from mmalign.encoders import whisper
from mmalign.llm import load, tuners

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def config(tmp_path_factory, tokenizer_dir, tone_shards) -> Path:
    return write_config(tmp_path_factory.mktemp("errors"), tokenizer_dir, tone_shards)


@pytest.fixture
def loads(monkeypatch) -> list[str]:
    """Names of the model loaders called (encoder, llm) and of peft's allocation, in order."""
    calls: list[str] = []

    def watch(module, name: str) -> None:
        real = getattr(module, name)

        def wrapper(*args, **kwargs):
            calls.append(name)
            return real(*args, **kwargs)

        monkeypatch.setattr(module, name, wrapper)

    watch(whisper, "load_hf_whisper_encoder")
    watch(load, "load_llm")
    watch(tuners, "get_peft_model")
    return calls


def fails(capsys, *args: str) -> tuple[int, str]:
    """Exit status and stderr of ``mmalign *args`` as a user sees them (Python prints a
    ``SystemExit`` message on stderr with status 1); any other exception escapes: a traceback."""
    with pytest.raises(SystemExit) as exc:
        main(list(args))
    err = capsys.readouterr().err
    code = exc.value.code
    if isinstance(code, str):
        err, code = err + code + "\n", 1
    assert code, err
    assert "Traceback" not in err
    return code, err.strip().splitlines()[-1]


def fit(config: Path, *extra: str) -> list[str]:
    return ["fit", "--config", str(config), *extra]


@pytest.mark.parametrize("lr", ["-1", "0", ".nan", ".inf"])
def test_bad_learning_rate(config, capsys, loads, lr):
    _, last = fails(capsys, *fit(config, f"--model.optimizer.init_args.lr={lr}"))
    value = {"-1": "-1.0", "0": "0.0", ".nan": "nan", ".inf": "inf"}[lr]
    assert f"model.optimizer.init_args.lr={value}:" in last and "> 0" in last
    assert not loads


def test_projector_rate_zero(config, capsys, loads):
    code, last = fails(capsys, *fit(config, "--model.projector.init_args.rate=0"))
    assert code == 2 and "model.projector.init_args.rate:" in last and ": 0 " in last
    assert not loads


def test_matryoshka_rate_zero(config, capsys, loads):
    projector = "--model.projector.class_path=mmalign.projectors.matryoshka.MatryoshkaProjector"
    code, last = fails(capsys, *fit(config, projector, "--model.projector.init_args.rates=[4,0]"))
    assert code == 2 and "model.projector.init_args.rates:" in last and ": 0 " in last
    assert not loads


@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_missing_shards(config, tmp_path, capsys, loads, split):
    missing = tmp_path / "no-such-shards"
    _, last = fails(capsys, *fit(config, f"--data.{split}={missing}"))
    assert f"data.{split}='{missing}'" in last and "no shards" in last
    assert not loads


@pytest.mark.parametrize("field", ["llm", "encoder"])
def test_missing_local_model_path(config, tmp_path, capsys, loads, field):
    missing = tmp_path / "no-such-model"
    _, last = fails(capsys, *fit(config, f"--model.{field}.init_args.source={missing}"))
    assert f"model.{field}.init_args.source='{missing}': no such file or directory" in last
    assert "Repo id" not in last
    assert not loads


def test_unreachable_hub_fails_at_once(config, capsys, loads, monkeypatch, tmp_path):
    """No network (here: the endpoint refuses connections): no minute of retries."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    for var in ("https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    _, last = fails(capsys, *fit(config, "--model.llm.init_args.source=nobody/no-such-model"))
    assert "model.llm.init_args.source='nobody/no-such-model': this machine is offline" in last
    assert "http://127.0.0.1:9 cannot be reached" in last and "pinned:" in last
    assert not loads


def test_adapter_rank_above_target_shapes(config, capsys, loads):
    r = "--model.llm.init_args.adapter.init_args.r=1000000"
    _, last = fails(capsys, *fit(config, r))
    assert "model.llm.init_args.adapter.init_args.r=1000000:" in last
    assert "= 32 of target" in last  # the tiny Llama's hidden size
    assert "get_peft_model" not in loads  # refused before peft allocates anything


def test_adapter_rank_of_wrong_type(config, tmp_path, capsys, loads):
    cfg = yaml.safe_load(config.read_text())
    cfg["model"]["llm"]["init_args"]["adapter"]["init_args"]["r"] = "eight"
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(cfg))
    code, last = fails(capsys, "fit", "--config", str(path))
    assert code == 2 and "model.llm.init_args.adapter.init_args.r:" in last and "eight" in last
    assert not loads


def command(*args: str, **env: str) -> subprocess.CompletedProcess:
    """``python -m mmalign *args``, offline, with ``env`` added (and no inherited debug)."""
    base = {k: v for k, v in os.environ.items() if k != "MMALIGN_DEBUG"}
    env = {**base, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), **env}
    cmd = [sys.executable, "-m", "mmalign", *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_offline_hub_id_fails_at_once(config, tmp_path):
    """The real command with HF_HUB_OFFLINE=1 and an empty cache."""
    source = "--model.llm.init_args.source=nobody/no-such-model"
    run = command(*fit(config, source), HF_HOME=str(tmp_path))
    last = run.stderr.strip().splitlines()[-1]
    assert run.returncode == 1 and "Traceback" not in run.stderr
    assert "model.llm.init_args.source='nobody/no-such-model': this machine is offline" in last
    assert "HF_HUB_OFFLINE" in last and "pinned:smollm2-135m-instruct" in last


@pytest.mark.parametrize("how", ["flag", "env"])
def test_debug_brings_the_traceback_back(config, tmp_path, how):
    args = fit(config, f"--data.train={tmp_path / 'none'}")
    run = command("--debug", *args) if how == "flag" else command(*args, MMALIGN_DEBUG="1")
    assert run.returncode == 1 and "Traceback" in run.stderr
    assert (
        run.stderr.strip()
        .splitlines()[-1]
        .startswith("mmalign.lightning_modules.config_check.ConfigError: data.train=")
    )


@pytest.mark.parametrize(
    "extra",
    [
        "--model.optimizer.init_args.lr=-1",
        "--model.projector.init_args.rate=0",
        "--model.llm.init_args.adapter.init_args.r=eight",
        "--data.val=/no/such/shards",
        "--model.llm.init_args.source=nobody/no-such-model",
    ],
)
def test_config_errors_stop_before_lightning_is_imported(config, tmp_path, extra):
    """Importing Lightning alone takes about 3 s here: these errors must not wait for it."""
    probe = (
        "import sys\n"
        "from mmalign.cli import main\n"
        "try:\n"
        f"    main({fit(config, extra)!r})\n"
        "except SystemExit:\n"
        "    print('lightning loaded:', 'lightning' in sys.modules)\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path), "PYTHONPATH": str(ROOT)}
    env.pop("MMALIGN_DEBUG", None)
    run = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert "lightning loaded: False" in run.stdout, run.stderr[-2000:]
