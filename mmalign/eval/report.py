"""Write an evaluation's results: ``metrics.json``, ``report.md``, PNG plots, ``utterances.jsonl``.

``metrics.json`` is the record (every figure and what produced it); ``report.md`` renders it as
Markdown tables, one per task family, with the plots and the worst utterances of each task;
``utterances.jsonl`` has one line per utterance and condition (``reference``/``hypothesis``, so
``mmalign score`` reads it too). Plots use matplotlib's Agg canvas directly (no pyplot state, no
display needed) and are drawn only for a sweep axis with more than one point.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

WORST_SHOWN = 5


def _snr_label(snr: float | None) -> str:
    return "clean" if snr is None else f"{snr:g}"


def _pct(x: float) -> str:
    return f"{100 * x:.2f}"


def results_table(results: Sequence[dict[str, Any]], translation: bool | None = None) -> str:
    """Markdown table of result rows: WER/CER rows, or BLEU/chrF rows when ``translation``
    (default: whatever the rows are; mixed rows need two calls)."""
    rows = [r for r in results if translation is None or ("bleu" in r) == translation]
    if not rows:
        return ""
    if "bleu" in rows[0]:
        head = (
            "| task | rate | SNR (dB) | utts | BLEU | chrF | audio s/s |\n"
            "|---|---|---|---|---|---|---|"
        )
        lines = [
            f"| {r['task']} | {r['rate']} | {_snr_label(r['snr'])} | {r['utterances']} | "
            f"{r['bleu']:.2f} | {r['chrf']:.2f} | {r['audio_seconds_per_second']:.2f} |"
            for r in rows
        ]
    else:
        head = (
            "| task | rate | SNR (dB) | utts | WER % | CER % | sub | del | ins | ref words "
            "| audio s/s |\n|---|---|---|---|---|---|---|---|---|---|---|"
        )
        lines = [
            f"| {r['task']} | {r['rate']} | {_snr_label(r['snr'])} | {r['utterances']} | "
            f"{_pct(r['wer'])} | {_pct(r['cer'])} | {r['substitutions']} | {r['deletions']} | "
            f"{r['insertions']} | {r['ref_words']} | {r['audio_seconds_per_second']:.2f} |"
            for r in rows
        ]
    return "\n".join([head, *lines])


def plot_sweep(
    results: Sequence[dict[str, Any]], axis: str, metric: str, path: Path
) -> Path | None:
    """Plot ``metric`` against ``axis`` (``snr`` or ``rate``), one line per task and value of the
    other axis. Clean audio on an SNR plot is a dashed horizontal line (it has no SNR value).
    Returns None (and draws nothing) when the axis has a single point."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = [r for r in results if metric in r]
    if len({r[axis] for r in rows}) < 2:
        return None
    other = "rate" if axis == "snr" else "snr"
    scale = 100.0 if metric in ("wer", "cer") else 1.0
    fig = Figure(figsize=(6, 4), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    series = sorted({(r["task"], r[other]) for r in rows}, key=lambda k: (k[0], str(k[1])))
    for i, (task, value) in enumerate(series):
        color = f"C{i % 10}"
        label = f"{task}, {other} {_snr_label(value) if other == 'snr' else value}"
        points = sorted(
            (r[axis], r[metric] * scale)
            for r in rows
            if r["task"] == task and r[other] == value and r[axis] is not None
        )
        if points:
            ax.plot(*zip(*points, strict=True), marker="o", color=color, label=label)
        if axis == "snr":
            clean = [
                r[metric] * scale
                for r in rows
                if r["task"] == task and r[other] == value and r[axis] is None
            ]
            if clean:
                ax.axhline(clean[0], color=color, linestyle="--", label=f"{label} (clean)")
    ax.set_xlabel("SNR (dB)" if axis == "snr" else "compression rate")
    ax.set_ylabel(f"{metric.upper()} %" if scale == 100.0 else metric.upper())
    if axis == "rate":
        ax.set_xticks(sorted({r["rate"] for r in rows}))
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    ax.set_title(f"{metric.upper()} vs {'SNR' if axis == 'snr' else 'compression rate'}")
    fig.tight_layout()
    fig.savefig(path)
    return path


def make_plots(results: Sequence[dict[str, Any]], out_dir: Path) -> list[Path]:
    """WER (transcription) and BLEU (translation) against SNR and against rate, where swept."""
    written = []
    for metric in ("wer", "bleu"):
        for axis in ("snr", "rate"):
            path = plot_sweep(results, axis, metric, out_dir / f"{metric}_vs_{axis}.png")
            if path is not None:
                written.append(path)
    return written


def _bullet_header(metrics: dict[str, Any]) -> list[str]:
    model, data, dec = metrics["model"], metrics["data"], metrics["decoding"]
    sha = (model.get("sha256") or "")[:12]
    tasks = ", ".join(f"{t} {n}" for t, n in data["tasks"].items())
    beams = "greedy" if dec["num_beams"] == 1 else f"beam search ({dec['num_beams']} beams)"
    cap = dec["max_new_tokens"] or "from duration"
    where = f"`{model['path']}`" if model.get("path") else "model object"
    lines = [
        f"- model: {where} ({model['kind']}{f', sha256 {sha}…' if sha else ''})",
        f"- data: `{data['spec']}`: {data['utterances']} utterances, "
        f"{data['audio_seconds']:.1f} s ({tasks}); {len(data['skipped'])} skipped",
        f"- normaliser: `{metrics['normalizer']}`; decoding: {beams}, max new tokens {cap}, "
        f"batches of at most {dec['batch_size']} utterances / {dec['batch_seconds']:g} s, "
        f"{dec['device']} {dec['dtype']}",
    ]
    lines += _length_lines(data.get("lengths"))
    noise = metrics.get("noise")
    if noise:
        what = (
            f"babble of {noise['speakers']} utterances"
            if noise["source"] == "babble"
            else f"`{noise['source']}` ({noise['clips']} clips)"
        )
        lines.append(f"- noise: {what}, seed {noise['seed']}, mixed with torchaudio `add_noise`")
    return lines


def _length_lines(lengths: dict[str, Any] | None) -> list[str]:
    """The length policy's bullet: how many utterances were chunked or skipped, and which."""
    if not lengths:
        return []
    counts = lengths["counts"]
    window = lengths["window_seconds"]
    head = f"- lengths: encoder window {f'{window:g} s' if window else 'unbounded'}"
    if not any(counts.values()):
        return [f"{head}; every utterance fits it and is at least {lengths['min_seconds']:g} s"]
    if lengths["chunk_seconds"] is not None:
        head += (
            f"; {counts['chunked']} longer utterance(s) decoded in {lengths['chunk_seconds']:g} s "
            f"chunks ({lengths['overlap_seconds']:g} s overlap), hypotheses joined"
        )
    head += (
        f"; {counts['too_short']} shorter than {lengths['min_seconds']:g} s and "
        f"{counts['too_long']} too long (with video) skipped"
    )
    named = [
        f"  - chunked: `{_cell(c['key'])}` ({c['duration']:g} s, {c['chunks']} chunks)"
        for c in lengths["chunked"][:WORST_SHOWN]
    ]
    named += [
        f"  - skipped: `{_cell(d['key'])}` ({d['duration']:g} s): {d['reason']}"
        for d in lengths["skipped"][:WORST_SHOWN]
    ]
    more = len(lengths["chunked"]) + len(lengths["skipped"]) - len(named)
    if more > 0:
        named.append(f"  - and {more} more in metrics.json (data.lengths)")
    return [head, *named]


def _cell(text: object) -> str:
    """Table-safe text: control characters (an untrained model emits them) become spaces."""
    clean = "".join(ch if ch.isprintable() else " " for ch in str(text))
    return " ".join(clean.split()).replace("|", "\\|")


def _worst(utterances: Sequence[dict[str, Any]], task: str) -> list[str]:
    """Worst utterances of ``task`` in its first condition (rows are worst first per condition)."""
    rows = [u for u in utterances if u["task"] == task]
    if not rows:
        return []
    first = (rows[0]["rate"], rows[0]["snr"])
    rows = [u for u in rows if (u["rate"], u["snr"]) == first][:WORST_SHOWN]
    score = "BLEU" if "bleu" in rows[0] else "WER %"
    out = [
        f"Worst {task} utterances (rate {first[0]}, SNR {_snr_label(first[1])}):",
        "",
        f"| key | {score} | reference | hypothesis |",
        "|---|---|---|---|",
    ]
    for u in rows:
        value = f"{u['bleu']:.1f}" if "bleu" in u else _pct(u["wer"])
        out.append(
            f"| {_cell(u['key'])} | {value} | {_cell(u['reference'])} | {_cell(u['hypothesis'])} |"
        )
    return out


def _image(path: Path) -> list[str]:
    return [f"![{path.stem.replace('_', ' ')}]({path.name})", ""]


def render_markdown(
    metrics: dict[str, Any], utterances: Sequence[dict[str, Any]], plots: Sequence[Path]
) -> str:
    """report.md: header bullets, a table per task family, plots, worst utterances."""
    results = metrics["results"]
    parts = ["# Evaluation report", "", *_bullet_header(metrics), ""]
    asr = results_table(results, translation=False)
    if asr:
        parts += ["## Transcription: WER and CER", "", asr, ""]
        parts += [line for p in plots if p.name.startswith("wer_") for line in _image(p)]
    st = results_table(results, translation=True)
    if st:
        sig = next(r for r in results if "bleu" in r)
        parts += ["## Translation: BLEU and chrF", "", st, ""]
        parts += [
            f"BLEU signature `{sig['bleu_signature']}`; chrF signature `{sig['chrf_signature']}`",
            "",
        ]
        parts += [line for p in plots if p.name.startswith("bleu_") for line in _image(p)]
    worst = [line for task in metrics["sweep"]["tasks"] for line in [*_worst(utterances, task), ""]]
    if any(worst):
        parts += ["## Worst utterances", "", *worst]
    versions = ", ".join(f"{k} {v}" for k, v in metrics["versions"].items() if v)
    parts += [f"<sub>{metrics['created']}; {versions}</sub>", ""]
    return "\n".join(parts)


def _finite(obj: Any) -> Any:
    """JSON has no NaN/inf: write them as null."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return obj


def write_outputs(
    out_dir: str | Path, metrics: dict[str, Any], utterances: Sequence[dict[str, Any]]
) -> list[Path]:
    """Write metrics.json, utterances.jsonl, plots and report.md into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob("*_vs_*.png"):  # plots of an earlier run with other sweeps
        stale.unlink()
    files = [out / "metrics.json", out / "utterances.jsonl"]
    files[0].write_text(json.dumps(_finite(metrics), indent=2, ensure_ascii=False) + "\n")
    with open(files[1], "w", encoding="utf-8") as fh:
        for row in utterances:
            fh.write(json.dumps(_finite(row), ensure_ascii=False) + "\n")
    plots = make_plots(metrics["results"], out)
    report = out / "report.md"
    report.write_text(render_markdown(metrics, utterances, plots), encoding="utf-8")
    return [*files, *plots, report]
