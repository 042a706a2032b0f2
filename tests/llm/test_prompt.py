import torch
from transformers import AutoTokenizer

from mmalign.llm.prompt import IGNORE_INDEX, PromptBuilder, splice


def test_chat_template_segments(tokenizer_dir):
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    pb = PromptBuilder(tok)
    head, tail = pb.segments("asr")
    text_head = tok.decode(head)
    # no lone space token before the modality: the LLM saw that space only inside a word token
    assert text_head.startswith("<|im_start|>user\n") and text_head.endswith("speech:")
    assert tok.decode(tail) == "<|im_end|>\n<|im_start|>assistant\n"
    assert pb.target("one two")[-1] == tok.convert_tokens_to_ids("<|im_end|>") == pb.end_id


def test_target_ends_with_the_templates_end_of_turn_not_eos(tokenizer_dir):
    """Llama-3-style: eos (end of text) differs from the token closing an assistant turn."""
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    tok.eos_token = "<|endoftext|>"
    pb = PromptBuilder(tok)
    end = tok.convert_tokens_to_ids("<|im_end|>")
    assert pb.target("one two")[-1] == end != tok.eos_token_id
    assert pb.stop_ids == sorted({end, tok.eos_token_id})


def test_plain_template_without_chat_template(plain_tokenizer_dir):
    tok = AutoTokenizer.from_pretrained(plain_tokenizer_dir)
    pb = PromptBuilder(tok)
    head, tail = pb.segments("asr")
    assert tok.decode(head).startswith(tok.bos_token)
    assert tok.decode(tail).endswith("Answer:")


def test_prompt_fields():
    class Tok:
        eos_token_id = 1
        chat_template = None
        bos_token = ""

    pb = PromptBuilder(Tok())
    assert pb.fields("st") == ["target_lang"]
    assert "German" in pb.text("st", target_lang="German")


def _embed(ids):
    return ids[:, None].float().repeat(1, 4)


def test_splice_right_padding_labels_and_positions():
    heads = [[5, 6], [7]]
    tails = [[8], [9, 9]]
    targets = [[11, 12, 2], [13, 2]]
    spans = [torch.full((3, 4), -1.0), torch.full((2, 4), -2.0)]
    s = splice(_embed, heads, spans, tails, targets, padding_side="right")
    # row 0: 2 head + 3 span + 1 tail + 3 target = 9; row 1: 1 + 2 + 2 + 2 = 7
    assert s.inputs_embeds.shape == (2, 9, 4)
    assert s.attention_mask.sum(1).tolist() == [9, 7]
    assert s.modality_start.tolist() == [2, 1]
    assert torch.equal(s.inputs_embeds[0, 2:5], spans[0])
    assert torch.equal(s.inputs_embeds[1, 1:3], spans[1])
    assert s.labels[0].tolist() == [IGNORE_INDEX] * 6 + [11, 12, 2]
    assert s.labels[1].tolist() == [IGNORE_INDEX] * 5 + [13, 2] + [IGNORE_INDEX] * 2


def test_splice_left_padding_for_generation():
    s = splice(_embed, [[5], [5, 6, 7]], [torch.zeros(1, 4)] * 2, [[8], [8]], None, "left")
    assert s.labels is None
    assert s.attention_mask.tolist() == [[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]]
    assert s.modality_start.tolist() == [3, 3]
    assert s.inputs_embeds[0, -1, 0] == 8  # every row ends with its prompt tail
