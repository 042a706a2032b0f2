import pytest

from mmalign.eval.metrics import error_rates, normalize


def test_english_normaliser_applied():
    r = error_rates(["Hello, World!"], ["hello world"])
    assert r["wer"] == 0.0


def test_none_normaliser_keeps_case():
    r = error_rates(["Hello world"], ["hello world"], "none")
    assert r["wer"] == 0.5


def test_counts():
    r = error_rates(["the cat sat", "a dog"], ["the bat sat down", "dog"], "basic")
    assert (r["substitutions"], r["deletions"], r["insertions"]) == (1, 1, 1)
    assert r["wer"] == pytest.approx(3 / 5)


def test_empty_reference_counts_insertions():
    r = error_rates(["", "a b"], ["x y", "a b"], "basic")
    assert r["insertions"] == 2 and r["wer"] == pytest.approx(1.0)


def test_unknown_normaliser():
    with pytest.raises(ValueError, match="normaliser"):
        normalize(["x"], "klingon")


def test_translation_metrics_are_sacrebleus_corpus_scores():
    import sacrebleu

    from mmalign.eval.metrics import translation_metrics

    refs = ["Das ist ein kleiner Test.", "Die Katze sitzt auf der Matte.", "Guten Morgen!"]
    hyps = ["Das ist ein Test.", "Die Katze sitzt auf einer Matte.", "Guten Abend!"]
    got = translation_metrics(refs, hyps)
    assert got["bleu"] == sacrebleu.corpus_bleu(hyps, [refs]).score
    assert got["chrf"] == sacrebleu.corpus_chrf(hyps, [refs]).score
    assert 0 < got["bleu"] < 100 and got["utterances"] == 3
    assert got["bleu_signature"].startswith("nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp")


def test_example_is_two_lines_whatever_the_hypothesis():
    from mmalign.eval.metrics import example

    rambling = "The speech is:\n\nThe speech is:\n" * 20
    text = example("one two", rambling, width=40)
    ref, hyp = text.split("\n")
    assert ref == "  ref: one two"
    assert hyp.startswith("  hyp: The speech is: The speech is:") and len(hyp) == 7 + 40
