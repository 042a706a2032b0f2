"""Safe loading: manifest paths stay inside their root; trust_remote_code is off unless asked."""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from conftest import tiny_llm_config, tiny_wavlm_config, tiny_whisper_config

from mmalign.cli import main
from mmalign.data.media import PathOutsideRootError
from mmalign.data.shards import prepare
from mmalign.eval.evaluate import build_parser as evaluate_parser
from mmalign.eval.samples import read_samples
from mmalign.inference.inputs import collect_inputs
from mmalign.inference.transcribe import build_parser as transcribe_parser


def tone(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    t = np.arange(4000) / 16000
    sf.write(path, (0.3 * np.sin(2 * np.pi * 300 * t)).astype("float32"), 16000)
    return path


@pytest.fixture
def tree(tmp_path: Path) -> dict[str, Path]:
    """``corpus/`` (the manifest's folder) with one clip inside, one clip beside it, and a
    symlink inside pointing at the one beside it."""
    corpus = tmp_path / "corpus"
    tone(corpus / "wav" / "in.wav")
    outside = tone(tmp_path / "secret" / "x.flac")
    (corpus / "wav" / "link.wav").symlink_to(outside)
    return {"tmp": tmp_path, "corpus": corpus, "outside": outside}


def write_manifest(corpus: Path, entries: list[dict]) -> Path:
    path = corpus / "m.jsonl"
    lines = [{"text": "one two", **e} for e in entries]
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


def escaping(tree: dict[str, Path]) -> list[tuple[dict, str]]:
    """Manifest entries whose path leaves ``corpus/``, with the field named in the error."""
    return [
        ({"audio": "../secret/x.flac"}, "audio"),
        ({"audio": str(tree["outside"])}, "audio"),
        ({"audio": "wav/link.wav"}, "audio"),
        ({"audio": "wav/in.wav", "video": "../secret/x.npy"}, "video"),
    ]


# -- prepare ---------------------------------------------------------------------------------


def test_prepare_refuses_paths_outside_the_manifest_folder(tree):
    for entry, field in escaping(tree):
        manifest = write_manifest(tree["corpus"], [{"audio": "wav/in.wav"}, entry])
        out = tree["tmp"] / "shards"
        with pytest.raises(PathOutsideRootError) as err:
            prepare(manifest, out, progress=False)
        message = str(err.value)
        assert f"{manifest}:2" in message and f"field {field!r}" in message, message
        assert "--root" in message
        assert not out.exists()  # refused before anything is written


def test_prepare_accepts_paths_inside_and_a_wider_root(tree):
    manifest = write_manifest(tree["corpus"], [{"audio": "wav/in.wav"}, {"audio": "./wav/in.wav"}])
    assert prepare(manifest, tree["tmp"] / "a", progress=False).written == 2
    wide = write_manifest(
        tree["corpus"],
        [{"audio": "../secret/x.flac"}, {"audio": "wav/link.wav"}, {"audio": "wav/in.wav"}],
    )
    report = prepare(wide, tree["tmp"] / "b", progress=False, root=tree["tmp"])
    assert report.written == 3
    assert prepare(wide, tree["tmp"] / "c", progress=False, root="/").written == 3


def test_prepare_root_through_a_symlinked_folder(tree):
    """A manifest reached through a symlinked folder is still inside its own folder."""
    alias = tree["tmp"] / "alias"
    alias.symlink_to(tree["corpus"], target_is_directory=True)
    write_manifest(tree["corpus"], [{"audio": "wav/in.wav"}])
    assert prepare(alias / "m.jsonl", tree["tmp"] / "out", progress=False).written == 1


def test_prepare_cli_root_option(tree):
    manifest = write_manifest(tree["corpus"], [{"audio": "../secret/x.flac"}])
    out = tree["tmp"] / "out"
    with pytest.raises(SystemExit, match=r"m\.jsonl:1: field 'audio'.*outside the allowed root"):
        main(["prepare", str(manifest), str(out)])
    main(["prepare", str(manifest), str(out), "--root", str(tree["tmp"])])
    assert (out / "index.json").is_file()


# -- transcribe and evaluate -----------------------------------------------------------------


def test_transcribe_refuses_paths_outside_the_manifest_folder(tree):
    for entry, field in escaping(tree):
        manifest = write_manifest(tree["corpus"], [{"audio": "wav/in.wav"}, entry])
        with pytest.raises(PathOutsideRootError) as err:
            collect_inputs([manifest])
        assert f"{manifest}:2" in str(err.value) and f"field {field!r}" in str(err.value)
    listing = tree["corpus"] / "files.lst"
    listing.write_text("wav/in.wav\n# comment\n../secret/x.flac\n")
    with pytest.raises(PathOutsideRootError, match=r"files\.lst:3: field 'path'"):
        collect_inputs([listing])


def test_transcribe_accepts_inside_paths_direct_files_and_root(tree):
    manifest = write_manifest(tree["corpus"], [{"audio": "wav/in.wav"}])
    (item,) = collect_inputs([manifest])
    assert item.path == tree["corpus"] / "wav" / "in.wav"
    assert len(collect_inputs([tree["outside"]])) == 1  # named on the command line: allowed
    wide = write_manifest(
        tree["corpus"], [{"audio": "../secret/x.flac"}, {"audio": "wav/link.wav"}]
    )
    assert len(collect_inputs([wide], root=tree["tmp"])) == 2


def test_transcribe_cli_root_option(tree):
    manifest = write_manifest(tree["corpus"], [{"audio": "wav/in.wav"}, {"audio": "wav/link.wav"}])
    argv = ["no-such-model", str(manifest), "--out", str(tree["tmp"] / "tx")]
    with pytest.raises(SystemExit, match=r"m\.jsonl:2: field 'audio'"):
        main(["transcribe", *argv])  # refused before the model is even looked for
    assert transcribe_parser().parse_args([*argv, "--root", "/"]).root == "/"
    with pytest.raises(SystemExit, match="model no-such-model not found"):
        main(["transcribe", *argv, "--root", str(tree["tmp"])])


def test_evaluate_refuses_paths_outside_the_manifest_folder(tree):
    for entry, field in escaping(tree):
        manifest = write_manifest(tree["corpus"], [{"audio": "wav/in.wav"}, entry])
        with pytest.raises(PathOutsideRootError) as err:
            read_samples(manifest)
        assert f"{manifest}:2" in str(err.value) and f"field {field!r}" in str(err.value)
    manifest = write_manifest(tree["corpus"], [{"audio": "wav/in.wav"}, {"audio": "wav/link.wav"}])
    samples, skipped = read_samples(manifest, root=tree["tmp"])
    assert len(samples) == 2 and not skipped
    args = evaluate_parser().parse_args(["m", str(manifest), "--out", "o", "--root", "/data"])
    assert args.root == "/data"


# -- trust_remote_code -----------------------------------------------------------------------


def test_llm_trust_remote_code_defaults_off_and_reaches_from_pretrained(monkeypatch, tokenizer_dir):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from mmalign.llm import load

    calls: list[tuple[str, object]] = []
    real_tokenizer = AutoTokenizer.from_pretrained

    def tokenizer(name, **kwargs):
        calls.append(("tokenizer", kwargs.get("trust_remote_code", "unset")))
        return real_tokenizer(str(tokenizer_dir))

    def model(name, **kwargs):
        calls.append(("model", kwargs.get("trust_remote_code", "unset")))
        return AutoModelForCausalLM.from_config(AutoConfig.for_model(**tiny_llm_config()))

    monkeypatch.setattr(load.AutoTokenizer, "from_pretrained", tokenizer)
    monkeypatch.setattr(load.AutoModelForCausalLM, "from_pretrained", model)
    llm = load.CausalLM("someone/some-llm")
    assert calls == [("tokenizer", False), ("model", False)]
    assert "trust_remote_code" not in llm.init_config()
    calls.clear()
    llm = load.CausalLM("someone/some-llm", trust_remote_code=True)
    assert calls == [("tokenizer", True), ("model", True)]
    assert llm.init_config()["trust_remote_code"] is True
    for fn in (load.CausalLM, load.load_llm, load.dequantized_gguf):
        assert inspect.signature(fn).parameters["trust_remote_code"].default is False
    assert "only for repos you trust" in load.CausalLM.__doc__


def test_encoders_never_trust_remote_code(monkeypatch, tmp_path):
    from transformers import WavLMConfig, WavLMModel, WhisperConfig, WhisperModel

    from mmalign.encoders import wavlm, whisper

    seen: list[object] = []

    def whisper_config(source, **kwargs):
        seen.append(kwargs.pop("trust_remote_code", "unset"))
        return WhisperConfig(**tiny_whisper_config(), **kwargs)

    def whisper_model(source, config, dtype, **kwargs):
        seen.append(kwargs.get("trust_remote_code", "unset"))
        return WhisperModel(config)

    def wavlm_model(source, dtype, **kwargs):
        seen.append(kwargs.get("trust_remote_code", "unset"))
        return WavLMModel(WavLMConfig(**tiny_wavlm_config()))

    monkeypatch.setattr(whisper.WhisperConfig, "from_pretrained", whisper_config)
    monkeypatch.setattr(whisper.WhisperModel, "from_pretrained", whisper_model)
    monkeypatch.setattr(wavlm.WavLMModel, "from_pretrained", wavlm_model)
    monkeypatch.setattr(
        wavlm.Wav2Vec2FeatureExtractor,
        "from_pretrained",
        classmethod(lambda cls, source, **kw: cls()),
    )
    whisper.WhisperEncoder(str(tmp_path))
    wavlm.WavLMEncoder(str(tmp_path))
    assert seen == [False, False, False]


def test_component_specs_only_build_mmalign_modules(monkeypatch) -> None:
    """A checkpoint's or export's JSON names classes; nothing else may be called from it."""
    from mmalign.components import build

    with pytest.raises(ValueError, match="outside"):
        build({"class_path": "subprocess.run", "init_args": {"args": ["true"]}})
    with pytest.raises(ValueError, match="not a torch.nn.Module"):
        build({"class_path": "mmalign.components.spec", "init_args": {}})
    monkeypatch.setenv("MMALIGN_COMPONENT_PREFIXES", "torch.nn.")
    assert isinstance(build({"class_path": "torch.nn.Identity"}), torch.nn.Identity)
    spec = {"class_path": "torch.nn.Identity", "init_args": {"trust_remote_code": True}}
    with pytest.raises(ValueError, match="MMALIGN_TRUST_REMOTE_CODE=1"):
        build(spec)
