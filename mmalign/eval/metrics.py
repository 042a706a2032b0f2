"""WER/CER after a named text normaliser (Whisper's, from the whisper-normalizer package), BLEU and
chrF (sacrebleu), per corpus and per utterance."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import cache
from typing import Any

import jiwer

NORMALIZERS = ("english", "basic", "none")


@cache
def normalizer(name: str = "english") -> Callable[[str], str]:
    """``english``: Whisper's English normaliser (spelling, numbers, contractions);
    ``basic``: Whisper's language-neutral one (case, punctuation, symbols); ``none``: as is."""
    if name == "english":
        from whisper_normalizer.english import EnglishTextNormalizer

        return EnglishTextNormalizer()
    if name == "basic":
        from whisper_normalizer.basic import BasicTextNormalizer

        return BasicTextNormalizer()
    if name == "none":
        return lambda s: s
    raise ValueError(f"normaliser {name!r} is not one of {NORMALIZERS}")


def normalize(texts: Sequence[str], name: str = "english") -> list[str]:
    norm = normalizer(name)
    return [" ".join(norm(t).split()) for t in texts]


def error_rates(
    references: Sequence[str], hypotheses: Sequence[str], normalize_with: str = "english"
) -> dict[str, float]:
    """Corpus WER and CER plus error counts. An empty reference (after normalisation) scores
    its hypothesis's words as insertions (jiwer 4 aligns it like any other)."""
    if len(references) != len(hypotheses):
        raise ValueError(f"{len(references)} references but {len(hypotheses)} hypotheses")
    refs = normalize(references, normalize_with)
    hyps = normalize(hypotheses, normalize_with)
    s = d = ins = hits = c_err = c_ref = 0
    if refs:
        w = jiwer.process_words(refs, hyps)
        s, d, ins, hits = w.substitutions, w.deletions, w.insertions, w.hits
        c = jiwer.process_characters(refs, hyps)
        c_err = c.substitutions + c.deletions + c.insertions
        c_ref = c.substitutions + c.deletions + c.hits
    n_ref = s + d + hits
    return {
        "wer": (s + d + ins) / max(n_ref, 1),
        "cer": c_err / max(c_ref, 1),
        "substitutions": s,
        "deletions": d,
        "insertions": ins,
        "ref_words": n_ref,
        "utterances": len(refs),
    }


def translation_metrics(references: Sequence[str], hypotheses: Sequence[str]) -> dict[str, Any]:
    """sacrebleu corpus BLEU and chrF on raw (detokenised) text, each with its signature, so
    a figure says how it was computed (tokeniser, smoothing, version)."""
    from sacrebleu.metrics import BLEU, CHRF

    if len(references) != len(hypotheses):
        raise ValueError(f"{len(references)} references but {len(hypotheses)} hypotheses")
    bleu, chrf = BLEU(), CHRF()
    refs, hyps = list(references), list(hypotheses)
    return {
        "bleu": bleu.corpus_score(hyps, [refs]).score,
        "chrf": chrf.corpus_score(hyps, [refs]).score,
        "bleu_signature": str(bleu.get_signature()),
        "chrf_signature": str(chrf.get_signature()),
        "utterances": len(refs),
    }


def transcription_scores(
    refs: Sequence[str], hyps: Sequence[str], normalizer: str
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Corpus WER/CER with counts, and the same counts per utterance (which sum to the corpus's:
    jiwer aligns each pair on its own)."""
    corpus = error_rates(refs, hyps, normalizer)
    per = []
    for ref, hyp in zip(refs, hyps, strict=True):
        r = error_rates([ref], [hyp], normalizer)
        per.append(
            {
                "wer": r["wer"],
                "cer": r["cer"],
                "substitutions": r["substitutions"],
                "deletions": r["deletions"],
                "insertions": r["insertions"],
                "ref_words": r["ref_words"],
            }
        )
    return corpus, per


def translation_scores(
    refs: Sequence[str], hyps: Sequence[str]
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """sacrebleu corpus BLEU and chrF on raw (detokenised) text with their signatures, and
    per-sentence BLEU (effective order, as sacrebleu recommends for single sentences)."""
    from sacrebleu.metrics import BLEU

    refs, hyps = list(refs), list(hyps)
    corpus = translation_metrics(refs, hyps)
    sentence = BLEU(effective_order=True)
    per = [{"bleu": sentence.sentence_score(h, [r]).score} for r, h in zip(refs, hyps, strict=True)]
    return corpus, per


def example(reference: str, hypothesis: str, width: int = 100) -> str:
    """A reference/hypothesis pair as two terminal lines: an untrained model's rambling (line
    breaks, hundreds of words) would otherwise fill the screen."""

    def line(text: str) -> str:
        text = " ".join(text.split())
        return text if len(text) <= width else text[: width - 1] + "…"

    return f"  ref: {line(reference)}\n  hyp: {line(hypothesis)}"
