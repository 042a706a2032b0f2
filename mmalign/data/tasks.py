"""Tasks as data: a sample names its task, and the task decides its target text and prompt.

A sample's JSON keeps the transcript in ``text`` and, for translation, its targets beside it:
``translation`` is a dict language code -> text (or one string with ``target_lang``), with
``source_lang`` (a sample written with task ``st`` and no ``translation`` has its target in
``text``). So one sample serves ASR (target: the transcript) and ST (target: the
translation into ``target_lang``); which one it is this time is set when it is read (the
sample's own ``task``, or a data source's ``task``/``target_lang`` override). Prompts are picked
per task and language pair: ``st:en-de`` wins over ``st`` when the prompt table has it (see
:class:`mmalign.llm.prompt.PromptBuilder`); ``{source_lang}``/``{target_lang}`` in a prompt are
filled with language names ("German"), not codes.
"""

from __future__ import annotations

from typing import Any

TRANSLATION_TASKS = frozenset({"st"})
LANGUAGE_NAMES = {
    "ar": "Arabic", "ca": "Catalan", "cy": "Welsh", "de": "German", "en": "English",
    "es": "Spanish", "et": "Estonian", "fa": "Persian", "fr": "French", "id": "Indonesian",
    "it": "Italian", "ja": "Japanese", "lv": "Latvian", "mn": "Mongolian", "nl": "Dutch",
    "pt": "Portuguese", "ro": "Romanian", "ru": "Russian", "sl": "Slovenian", "sv": "Swedish",
    "ta": "Tamil", "tr": "Turkish", "zh": "Chinese",
}  # fmt: skip


class TaskError(ValueError):
    """A sample cannot serve the task asked of it (e.g. no translation into the language)."""


def language_name(code: str) -> str:
    """``de`` -> ``German``; unknown codes pass through (they may already be names)."""
    return LANGUAGE_NAMES.get(str(code).lower(), str(code))


def target_language(meta: dict[str, Any]) -> str | None:
    """The translation target of a sample: ``target_lang``, or the only key of ``translation``."""
    tgt = meta.get("target_lang")
    translation = meta.get("translation")
    if tgt is None and isinstance(translation, dict) and len(translation) == 1:
        tgt = next(iter(translation))
    return None if tgt is None else str(tgt)


def target_text(meta: dict[str, Any], task: str) -> str:
    """What the model must output for ``task``: the transcript, or the translation."""
    if task not in TRANSLATION_TASKS:
        text = meta.get("text")
        if not isinstance(text, str) or not text.strip():
            raise TaskError("missing text")
        return text
    translation = meta.get("translation")
    tgt = target_language(meta)
    if translation is None:  # a translation-only sample: its text is the target
        return target_text(meta, "asr")
    if isinstance(translation, dict):
        if tgt is None:
            raise TaskError(
                f"missing target_lang: task {task!r} and translations into {sorted(translation)}"
            )
        value = translation.get(tgt)
    else:
        value = translation
    if not isinstance(value, str) or not value.strip():
        raise TaskError(f"missing translation into {tgt or '?'}")
    return value


def apply_task(
    sample: dict[str, Any], task: str | None = None, target_lang: str | None = None
) -> dict[str, Any]:
    """``sample`` with its task (and target language) set and ``text`` the matching target.

    ``meta`` keeps the JSON as written; the transcript stays in ``transcript``. Raises
    :class:`TaskError` when the sample has no target for the task.
    """
    meta = dict(sample.get("meta") or {})
    if "transcript" not in sample:
        transcript = meta.get("text", sample.get("text"))
    else:
        transcript = sample["transcript"]
    meta.setdefault("text", transcript)
    if target_lang is not None:
        meta["target_lang"] = target_lang
    task = task or str(sample.get("task") or meta.get("task") or "asr")
    own_task = meta.get("task") or sample.get("task")
    if task in TRANSLATION_TASKS and meta.get("translation") is None and own_task != task:
        # only a sample written as translation has its target in ``text``
        raise TaskError(f"missing translation into {target_language(meta) or '?'}")
    if task in TRANSLATION_TASKS and target_language(meta) is not None:
        meta["target_lang"] = target_language(meta)
    return {
        **sample,
        "task": task,
        "meta": meta,
        "transcript": transcript,
        "text": target_text(meta, task),
    }


def prompt_key(prompts: dict[str, str], task: str, meta: dict[str, Any]) -> str:
    """``task:src-tgt`` when the prompt table has that pair, else ``task``."""
    src, tgt = meta.get("source_lang"), target_language(meta)
    if src and tgt and f"{task}:{src}-{tgt}" in prompts:
        return f"{task}:{src}-{tgt}"
    return task


def prompt_value(field: str, meta: dict[str, Any]) -> str:
    """A prompt field's text from a sample: language fields as names, others as written."""
    if field == "target_lang":
        tgt = target_language(meta)
        if tgt is None:
            raise KeyError(field)
        return language_name(tgt)
    if field == "source_lang" and "source_lang" in meta:
        return language_name(meta["source_lang"])
    return str(meta[field])
