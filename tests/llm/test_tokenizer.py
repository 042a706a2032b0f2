"""The ChatML tokenizer that random-initialised benchmark LLMs train on their own text."""

from __future__ import annotations

from transformers import AutoTokenizer

from mmalign.llm.tokenizer import train_chatml_tokenizer


def test_chatml_tokenizer_round_trips_and_templates(tmp_path):
    texts = ["transcribe the speech", "the quick brown fox jumps over the lazy dog"] * 20
    out = train_chatml_tokenizer(texts, tmp_path / "tok", vocab_size=400)
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.eos_token == tok.pad_token == "<|im_end|>"
    ids = tok("the quick brown fox", add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == "the quick brown fox"
    assert len(ids) < len("the quick brown fox")  # merges were learnt
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert prompt == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
