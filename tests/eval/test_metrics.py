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
