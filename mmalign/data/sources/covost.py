"""CoVoST 2: a TSV of Common Voice clips with translations -> manifest entries.

CoVoST 2 ships ``covost_v2.<src>_<tgt>.<split>.tsv`` (e.g. ``covost_v2.en_de.dev.tsv``) with a
header ``path  sentence  translation  client_id`` (tab-separated, no quoting: sentences contain
quotes) and refers to Common Voice clips (mp3) by file name; the clips live in Common Voice's
``clips`` folder, by default ``<tsv folder>/clips``. The combined file ``covost_v2.<src>_<tgt>.tsv``
has an extra ``split`` column, and ``split`` then selects the rows.

Each entry is ``{"audio", "text" (sentence), "translation": {tgt: translation}, "source_lang",
"target_lang", "key" (clip name stem), "speaker" (client_id)}``. Rows with missing columns,
empty text or translation, or invalid UTF-8 are skipped with their file and line.
"""

from __future__ import annotations

import re
from pathlib import Path

from mmalign.data.sources import Entry, Imported, read_tsv

COLUMNS = ("path", "sentence", "translation", "client_id")
# covost_v2.en_de.dev.tsv, covost_v2.zh-CN_en.train.tsv, covost_v2.fr_en.tsv
_NAME = re.compile(
    r"covost_v2\.(?P<src>[A-Za-z]{2,3}(?:-[A-Za-z]{2,4})?)_(?P<tgt>[A-Za-z]{2,3}(?:-[A-Za-z]{2,4})?)"
    r"(?:\.(?P<split>[A-Za-z0-9_-]+))?\.tsv"
)


def name_info(path: str | Path) -> tuple[str, str, str | None] | None:
    """``(source_lang, target_lang, split or None)`` from a CoVoST file name, else None."""
    match = _NAME.fullmatch(Path(path).name)
    return None if match is None else (match["src"], match["tgt"], match["split"])


def read_covost(
    tsv: str | Path,
    *,
    clips: str | Path | None = None,
    source_lang: str | None = None,
    target_lang: str | None = None,
    split: str | None = None,
) -> Imported:
    """Read a CoVoST 2 TSV into manifest entries (clips resolved against ``clips``).

    Languages come from the file name unless given; ``split`` keeps the rows of one split of
    the combined TSV (its ``split`` column), or must match the split in the file name.
    """
    tsv = Path(tsv).expanduser()
    if not tsv.is_file():
        raise FileNotFoundError(f"covost: {tsv} is not a file")
    info = name_info(tsv)
    src = source_lang or (info[0] if info else None)
    tgt = target_lang or (info[1] if info else None)
    if not src or not tgt:
        raise ValueError(
            f"covost: cannot tell the languages of {tsv} (expected a name like "
            "covost_v2.en_de.dev.tsv); pass source_lang and target_lang"
        )
    clip_dir = Path(clips).expanduser() if clips is not None else tsv.parent / "clips"
    result = Imported()
    header, rows = read_tsv(tsv, COLUMNS, result, "covost")
    has_split = "split" in header
    if split is not None and not has_split and info and info[2] not in (None, split):
        raise ValueError(f"covost: {tsv} holds split {info[2]!r}, not {split!r}")
    for line, row in rows:
        if split is not None and has_split and row["split"] != split:
            continue
        path, sentence, translation, client = (row[c].strip() for c in COLUMNS)
        if not path:
            result.skip(tsv, line, "empty 'path'")
            continue
        if not sentence:
            result.skip(tsv, line, "empty 'sentence'")
            continue
        if not translation:
            result.skip(tsv, line, "empty 'translation'")
            continue
        record = {
            "audio": str(clip_dir / path),
            "text": sentence,
            "translation": {tgt: translation},
            "source_lang": src,
            "target_lang": tgt,
            "key": Path(path).stem,
            "speaker": client,
        }
        result.entries.append(Entry(record, str(tsv), line))
    return result
