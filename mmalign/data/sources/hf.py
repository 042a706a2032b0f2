"""Hugging Face datasets: a ``save_to_disk`` folder or parquet files with an Audio column.

Layouts: a ``DatasetDict`` folder (``dataset_dict.json``, one subfolder per split: ``split``
picks one) or one split's folder (``state.json`` + ``dataset_info.json`` + ``*.arrow``), as
``save_to_disk`` writes them; or parquet files (one file, a folder searched two levels deep, or a
glob such as ``data/train-*.parquet``; ``split`` keeps the files whose name starts with
``<split>-`` or that lie in a folder named ``<split>``, as the Hub lays them out).

Each row becomes ``{"audio" (its arrow/parquet file), "text" (``text_column``, default the
first of ``text``, ``sentence``, ``transcription``), "key" (its ``id`` column, else
``<file stem>_<row>``), "row", and every other number, flag or string column}``. The audio is
decoded when the sample is written, by the datasets library's own ``Audio`` feature (torchcodec
underneath), at the file's own rate; ``prepare`` resamples it. A row whose audio does not
decode, or whose text is empty, is skipped with its file and row (``line`` is the row's index in
that file, as ``Dataset.from_file(file)[row]`` takes it).

``datasets`` is an optional extra (``pip install 'mmalign[hf]'``), imported only here.
"""

from __future__ import annotations

import bisect
import glob
import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from mmalign.data.sources import Entry, Imported

TEXT_COLUMNS = ("text", "sentence", "transcription")
# manifest fields that mean something to prepare: a dataset column of that name is kept as hf_<name>
RESERVED = ("audio", "video", "video_fps", "offset", "duration", "sample_rate", "source", "row")
SPLITS = ("train", "validation", "dev", "test")
SCALARS = ("int", "uint", "float", "bool", "string", "large_string")


def _datasets() -> Any:
    try:
        import datasets
    except ImportError as exn:
        raise ImportError(
            "prepare --format hf needs the datasets library: pip install 'mmalign[hf]'"
        ) from exn
    return datasets


def _parquet(source: Path) -> list[Path]:
    text = str(source)
    if glob.has_magic(text):
        return sorted(Path(p) for p in glob.glob(text) if p.endswith(".parquet"))
    if source.is_file():
        return [source] if source.suffix == ".parquet" else []
    return sorted(p for depth in ("*", "*/*", "*/*/*") for p in source.glob(f"{depth}.parquet"))


def _saved(folder: Path) -> bool:
    return folder.is_dir() and any(
        (folder / name).is_file() for name in ("dataset_dict.json", "state.json")
    )


def is_hf(source: Path) -> bool:
    """A ``save_to_disk`` folder, a parquet file, a folder of them or a glob matching some."""
    return _saved(source) or bool(_parquet(source))


def _split_files(source: Path, split: str | None) -> tuple[list[Path], str]:
    """The arrow or parquet files of the chosen split and their kind (``arrow``/``parquet``)."""
    if _saved(source):
        if (source / "dataset_dict.json").is_file():
            names = json.loads((source / "dataset_dict.json").read_text())["splits"]
            if split is None and len(names) == 1:
                split = names[0]
            if split not in names:
                raise ValueError(f"hf: {source} holds splits {names}; pick one with --split")
            source = source / split
        elif split is not None:
            raise ValueError(f"hf: {source} is one split's folder; --split does not apply")
        dataset = _datasets().load_from_disk(str(source))
        return [Path(f["filename"]) for f in dataset.cache_files], "arrow"
    files = _parquet(source)
    if not files:
        raise ValueError(f"hf: no save_to_disk folder or parquet files at {source}")

    def tag(path: Path) -> str:
        return next((p for p in path.parts[:-1] if p in SPLITS), path.name.split("-")[0])

    tags = sorted({tag(p) for p in files})
    if split is not None:
        files = [p for p in files if tag(p) == split]
        if not files:
            raise ValueError(f"hf: no parquet files of split {split!r} at {source} ({tags})")
    elif len(set(tags) & set(SPLITS)) > 1:
        raise ValueError(f"hf: {source} holds the splits {tags}; pick one with --split")
    return files, "parquet"


def _features(path: Path, kind: str) -> Any:
    datasets = _datasets()
    if kind == "arrow":
        return datasets.Dataset.from_file(str(path)).features
    import pyarrow.parquet as pq

    return datasets.Features.from_arrow_schema(pq.read_schema(path))


def _rows(path: Path, kind: str, columns: list[str]) -> Any:
    """Dicts of ``columns``, row by row, without touching the audio."""
    if kind == "arrow":
        dataset = _datasets().Dataset.from_file(str(path)).select_columns(columns)
        for batch in dataset.with_format("arrow").iter(batch_size=1000):
            yield from batch.to_pylist()
        return
    import pyarrow.parquet as pq

    for batch in pq.ParquetFile(path).iter_batches(columns=columns, batch_size=1000):
        yield from batch.to_pylist()


def _audio_column(features: Any, path: Path) -> str:
    audio = _datasets().Audio
    found = [name for name, f in features.items() if isinstance(f, audio)]
    found += [
        name  # parquet written without the datasets metadata: a {bytes, path} struct
        for name, f in features.items()
        if isinstance(f, dict) and set(f) == {"bytes", "path"}
    ]
    if not found:
        raise ValueError(f"hf: {path}: no Audio column among {list(features)}")
    return "audio" if "audio" in found else found[0]


def read_hf(
    source: str | Path, *, split: str | None = None, text_column: str | None = None
) -> Imported:
    """Manifest entries of every row of one split (its audio read later, row by row)."""
    source = Path(source).expanduser()
    files, kind = _split_files(source, split)
    features = _features(files[0], kind)
    audio = _audio_column(features, files[0])
    columns = list(features)
    text = text_column or next((c for c in TEXT_COLUMNS if c in columns), None)
    if text not in columns:
        wanted = repr(text_column) if text_column else f"any of {list(TEXT_COLUMNS)}"
        raise ValueError(f"hf: {files[0]}: no text column {wanted} among {columns}")
    value = _datasets().Value
    kept = [
        c  # numbers, flags and strings (JSON can hold them; bytes and timestamps it cannot)
        for c, f in features.items()
        if isinstance(f, value) and f.dtype.startswith(SCALARS) and c not in (audio, text)
    ]
    result = Imported()
    for path in files:
        for row, fields in enumerate(_rows(path, kind, [text, *kept])):
            sentence = fields.pop(text)
            if not isinstance(sentence, str) or not sentence.strip():
                result.skip(path, row, f"row {row}: empty text column {text!r}")
                continue
            record = {f"hf_{k}" if k in RESERVED else k: v for k, v in fields.items()}
            record.update(audio=str(path), text=sentence.strip(), row=row)
            record["key"] = str(fields["id"]) if fields.get("id") else f"{path.stem}_{row}"
            reader = HFAudio(str(path), kind, row, audio)
            result.entries.append(Entry(record, str(path), row, audio_reader=reader))
    return result


@dataclass(frozen=True)
class HFAudio:
    """Decodes one row's audio with ``datasets.Audio`` (picklable: worker processes open the
    file themselves, memory-mapped for arrow, one row group at a time for parquet)."""

    file: str
    kind: str
    row: int
    column: str

    def __call__(self) -> tuple[Any, int]:
        cell = _arrow_cell if self.kind == "arrow" else _parquet_cell
        try:
            decoded = _datasets().Audio().decode_example(cell(self.file, self.column, self.row))
            if hasattr(decoded, "get_all_samples"):  # datasets >= 4: a torchcodec decoder
                samples = decoded.get_all_samples()
                return samples.data, int(samples.sample_rate)
            return decoded["array"], int(decoded["sampling_rate"])
        except Exception as exn:  # torchcodec/ffmpeg raise RuntimeError and others
            raise ValueError(f"row {self.row}, column {self.column!r}: {exn}") from exn


@lru_cache(maxsize=4)
def _arrow_table(file: str, column: str) -> Any:
    return _datasets().Dataset.from_file(file).select_columns([column]).with_format("arrow")


def _arrow_cell(file: str, column: str, row: int) -> Any:
    return _arrow_table(file, column)[row].column(column)[0].as_py()


@lru_cache(maxsize=8)
def _parquet_groups(file: str) -> tuple[Any, list[int]]:
    """The open file and the first row of each row group."""
    import pyarrow.parquet as pq

    parquet = pq.ParquetFile(file)
    starts, total = [], 0
    for group in range(parquet.num_row_groups):
        starts.append(total)
        total += parquet.metadata.row_group(group).num_rows
    return parquet, starts


@lru_cache(maxsize=1)
def _parquet_group(file: str, column: str, group: int) -> Any:
    return _parquet_groups(file)[0].read_row_group(group, columns=[column]).column(column)


def _parquet_cell(file: str, column: str, row: int) -> Any:
    starts = _parquet_groups(file)[1]
    group = bisect.bisect_right(starts, row) - 1
    return _parquet_group(file, column, group)[row - starts[group]].as_py()
