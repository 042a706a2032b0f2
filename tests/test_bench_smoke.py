"""Code paths of the performance benchmarks (bench/), on tiny inputs; no timing is asserted."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import torch

ROOT = Path(__file__).resolve().parents[1]
# what the lent GPU machines lack (see the device README's package list):
# bench/gpu_train.py must run without them
MISSING_ON_GPU_IMAGE = ("webdataset", "jiwer", "open_clip", "soundfile", "torchcodec", "gguf")


def load_bench(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "bench" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_train_tiny_runs_without_the_packages_the_gpu_image_lacks(tmp_path):
    out = tmp_path / "gpu.json"
    blocker = "import sys, runpy\n"
    blocker += "".join(f"sys.modules[{name!r}] = None\n" for name in MISSING_ON_GPU_IMAGE)
    blocker += (
        f"sys.argv = ['gpu_train.py', '--device', 'cpu', '--tiny', '--json', {str(out)!r}]\n"
        f"runpy.run_path({str(ROOT / 'bench' / 'gpu_train.py')!r}, run_name='__main__')\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", blocker], capture_output=True, text=True, cwd=tmp_path
    )
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(out.read_text())
    (row,) = result["rows"]
    assert row["encoder"] == row["llm"] == "tiny"
    assert row["train_samples"] > 0 and row["achieved_tflops"] > 0
    assert row["mfu"] is None  # no peak known for a CPU
    assert 0 < row["llm_padding_efficiency"] <= 1
    assert row["transcribe_utterances"] == 4
    assert "| tiny | tiny |" in load_bench("gpu_train").table(result)


def test_gpu_train_refuses_without_cuda():
    if torch.cuda.is_available():
        return
    run = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "gpu_train.py")], capture_output=True, text=True
    )
    assert run.returncode != 0 and "needs a CUDA GPU" in run.stderr


def test_gpu_train_flops_formula():
    g = load_bench("gpu_train")
    p = {
        "encoder": 1000,
        "encoder_conv1": 100,
        "encoder_positions": 300,
        "encoder_layers": 2,
        "encoder_width": 8,
        "projector": 50,
        "llm_frozen_body": 2000,
        "llm_lora": 10,
        "llm_vocab": 30,
        "llm_width": 4,
        "llm_layers": 3,
        "llm_attention_width": 4,
    }
    shape = {"mel": [8, 6], "mel_window": 8, "llm": [5, 4], "llm_row": 5}
    shape |= {"targets": 3, "logit_rows": 6}
    enc = [4, 3]  # (mel + 1) // 2
    pairs = zip([8, 6], enc, strict=True)
    expected = sum(2 * 100 * m + 2 * 600 * t + 4 * 2 * 8 * t * t for m, t in pairs)
    expected += 4 * 50 * sum(math.ceil(t / 4) for t in enc)
    expected += (4 * 2000 + 6 * 10) * 9 + 4 * 30 * 4 * 3
    expected += 3 * sum(4 * 0.5 * 3 * 4 * n * n for n in (5, 4))
    assert math.isclose(g.step_flops(p, shape, padded=False), expected)
    assert g.step_flops(p, shape, padded=True) > g.step_flops(p, shape, padded=False)


def test_train_throughput_baseline_batching_features_and_memory():
    from mmalign.data.features import WhisperFeatures

    t = load_bench("train_throughput")
    samples = [
        {"audio": torch.randn(n), "text": "a b", "task": "asr", "meta": {}, "duration": n / 16000}
        for n in (16000, 40000)
    ]
    batch = t.pad_waveforms(samples)
    assert batch["audio"].shape == (2, 30 * 16000)
    batch = t.in_step_features(batch, WhisperFeatures())
    assert batch["audio_lengths"].tolist() == [100, 250]
    assert batch["audio_features"].shape == (2, 80, 250)
    # Llama-AVSR's buckets: summed (not padded) length per batch within the budget
    seconds = [1.0, 14.0, 3.0, 2.5, 7.0, 6.0, 12.0]
    batches = t.bucket_batches(seconds, budget=15.0)
    assert sorted(i for b in batches for i in b) == list(range(len(seconds)))
    assert all(sum(seconds[i] for i in b) <= 15.0 or len(b) == 1 for b in batches)
    meter = t.PeakMemory("cpu")
    meter.start()
    block = torch.ones(16 * 2**20)  # 64 MB, written
    peak = meter.stop()
    del block
    assert peak > (32 if meter.per_step else 0)


def test_perf_doc_renders_every_section(tmp_path):
    doc = load_bench("perf_doc")
    text = doc.render(tmp_path)
    assert "The GPU benchmark has not been run" in text
    assert "Not run yet: no `bench/results/train_throughput.json`" in text
    gpu = {
        "command": "python bench/gpu_train.py",
        "date": "2026-01-01",
        "device": "cuda",
        "device_name": "NVIDIA H100 80GB HBM3",
        "settings": {"batch_seconds": 240.0, "steps": 10, "warmup": 3, "decode_batch_size": 16},
        "environment": {"torch": "2.11"},
        "rows": [
            {
                "encoder": "whisper-small",
                "llm": "qwen2.5-0.5b",
                "train_samples_per_second": 100.0,
                "train_audio_seconds_per_second": 700.0,
                "achieved_tflops": 300.0,
                "mfu": 0.3,
                "mfu_padded": 0.35,
                "peak_memory_gib": 20.0,
                "transcribe_audio_seconds_per_second": 900.0,
            }
        ],
    }
    (tmp_path / "gpu_train.json").write_text(json.dumps(gpu))
    text = doc.render(tmp_path)
    assert "has not been run" not in text
    assert "- date: 2026-01-01" in text and "NVIDIA H100 80GB HBM3" in text
    assert "`python bench/gpu_train.py`" in text and "| 30.0% |" in text


def test_perf_doc_renders_a_sweep_in_numeric_order(tmp_path):
    doc = load_bench("perf_doc")
    key = "model.llm.init_args.adapter.init_args.lora_one_config.gamma"
    for gamma, wer in ((16, 0.2), (128, 0.05), (64, 0.03)):
        row = {
            "adapter": f"lora_one {key}={gamma}",
            "wer": wer,
            "loss_first": 4.0,
            "loss_last": 0.1,
            "trainable_parameters": 10,
            "step_seconds_median": 1.0,
            "init_seconds": 2.0,
        }
        result = {
            "command": f"python bench/adapters.py --set gamma={gamma}",
            "date": "2026-01-01",
            "settings": {"steps": 100, "test_utts": 60},
            "rows": [row],
            "total_seconds": 1.0,
            "environment": {"device": "cpu", "cpus": 2},
        }
        (tmp_path / f"adapters_lora_one_gamma{gamma}.json").write_text(json.dumps(result))
    (tmp_path / "adapters_lora_one_gamma16.partial.json").write_text("{}")  # not a result
    text = doc.render(tmp_path)
    rows = [line for line in text.splitlines() if line.startswith("| lora_one gamma=")]
    assert rows[0].startswith("| lora_one gamma=16 | 20.00%")
    assert [r.split()[2] for r in rows] == ["gamma=16", "gamma=64", "gamma=128"]
    assert "`bench/results/adapters_lora_one_gamma128.json`" in text


def test_step_profile_counts_python_tensors_and_renders():
    sp = load_bench("step_profile")
    counter = sp.PythonTensors()
    with counter:
        torch.tensor([1, 2])
        torch.as_tensor([3])
        torch.zeros(3)  # not from Python data
    assert counter.count == 2
    result = {
        "date": "2026-01-01",
        "environment": {"device": "cpu", "threads": 2},
        "gap": {"arms": {"bare": {"median_s": 1.0}, "fit": {"median_s": 1.02}}, "gap": 0.02},
        "profile": {
            "batch": 16,
            "target_tokens": 200,
            "pairs": {"logits_bytes": 2**20, "python_tensors": 3, "sync_calls": None},
            "union": {"logits_bytes": 6 * 2**20, "python_tensors": 3, "sync_calls": None},
            "full_logits_bytes": 9 * 2**20,
        },
    }
    text = sp.table(result)
    assert "gap fit / bare - 1: +2.0%" in text and "| union | 6 | 3 | n/a |" in text


def test_convergence_arm_config_and_reach(tmp_path):
    import argparse

    import yaml

    conv = load_bench("convergence")
    args = argparse.Namespace(steps=40, every=10, out_dir=tmp_path, corpus=tmp_path / "c")
    cfg = yaml.safe_load(conv.arm_config("plain", args).read_text())
    assert cfg["model"]["ctc_only_steps"] == 0 and cfg["model"]["ctc_weight"] == 0.0
    assert cfg["trainer"]["max_steps"] == 40 and cfg["trainer"]["limit_val_batches"] == 0
    assert cfg["data"]["train"] == str(tmp_path / "c" / "shards" / "train")
    shipped = yaml.safe_load(conv.CONFIG.read_text())["model"]
    default = yaml.safe_load(conv.arm_config("default", args).read_text())["model"]
    assert default == shipped  # the "default" arm is the config as shipped
    assert conv.ctc_stage("plain") == 0 and conv.ctc_stage("ctc_long_embed") == 2100
    assert conv.ctc_stage("default") == shipped.get("ctc_only_steps", 0)
    # a CTC-stage checkpoint: only the CTC head is scored (the untrained LLM is not decoded)
    rows = [{"step": 5, "train_minutes": 0.5, "wer": {}, "ctc_wer": {"test": 90.0}}]
    rows += [
        {"step": s, "train_minutes": s / 10, "wer": {"test": w, "val": w, "test_synth": w}}
        for s, w in ((10, 80.0), (20, 45.0), (30, 29.0), (40, 31.0))
    ]
    assert conv.reached(rows, "test") == {
        "50": {"step": 20, "minutes": 2.0},
        "30": {"step": 30, "minutes": 3.0},
        "15": None,
    }
    result = {
        "settings": {"steps": 40, "every": 10, "eval_n": 5},
        "environment": {"cpus": 2},
        "arms": {"plain": {"overrides": conv.ARMS["plain"], "rows": rows,
                           "reached": {"test": conv.reached(rows, "test")}}},
    }  # fmt: skip
    text = conv.table(result)
    assert "| plain |" in text and "step 30 (3.0 min)" in text and "not reached" in text
    assert "| plain, CTC head alone | 90.0 |" in text  # the stage's row, LLM cell left empty
    conv.plot(result, tmp_path / "plot.png")
    assert (tmp_path / "plot.png").stat().st_size > 0
