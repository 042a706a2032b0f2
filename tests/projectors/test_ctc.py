"""CTC of projector outputs against the LLM vocabulary: targets, lengths, blank, skipping."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from conftest import make_tiny_parts, tiny_batch

from mmalign.model import SpeechLLM
from mmalign.projectors.ctc import VocabCTC, ctc_feasible
from mmalign.projectors.mlp import MLPProjector


def test_feasible_counts_a_blank_between_repeated_tokens():
    assert ctc_feasible([5, 6, 7], 3)
    assert not ctc_feasible([5, 5, 7], 3)  # 5 _ 5 7 needs four frames
    assert ctc_feasible([5, 5, 7], 4)
    assert not ctc_feasible([], 10)


def test_loss_is_torch_ctc_per_sample_with_the_blank_last_and_skips_short_outputs():
    torch.manual_seed(0)
    vocab = torch.randn(11, 8)
    head = VocabCTC(8)
    with torch.no_grad():
        head.blank.normal_()
    frames = torch.randn(3, 6, 8, requires_grad=True)
    targets = [[1, 2, 3], [4, 4, 4, 4], [7]]  # the second needs 7 frames: skipped
    lengths = [6, 6, 2]
    loss, skipped = head.loss(frames, lengths, targets, vocab)
    assert skipped == 1
    expected = 0.0
    for i in (0, 2):
        logits = head.logits(frames[i : i + 1, : lengths[i]], vocab)
        assert logits.shape == (1, lengths[i], 12)  # 11 tokens + blank
        expected += F.ctc_loss(
            logits.log_softmax(-1).transpose(0, 1),
            torch.tensor([targets[i]]),
            torch.tensor([lengths[i]]),
            torch.tensor([len(targets[i])]),
            blank=11,
            reduction="sum",
        )
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert frames.grad[1].abs().sum() == 0  # the skipped sample takes no part
    assert frames.grad[0, :6].abs().sum() > 0 and frames.grad[2, 2:].abs().sum() == 0


def test_all_too_short_gives_zero_loss_not_a_crash():
    head = VocabCTC(4)
    frames = torch.randn(2, 2, 4, requires_grad=True)
    loss, skipped = head.loss(frames, [2, 1], [[1, 2, 3], [1, 2]], torch.randn(5, 4))
    assert skipped == 2 and loss.item() == 0.0
    loss.backward()  # still part of the graph


def test_greedy_merges_repeats_and_drops_blanks():
    vocab = torch.eye(4)  # token i scores frame e_i highest
    head = VocabCTC(4)
    with torch.no_grad():
        head.blank.copy_(torch.tensor([0.0, 0.0, 0.0, 2.0]))  # e_3 is the blank's frame
        head.log_scale.zero_()
    frames = torch.stack([torch.eye(4)[i] for i in (1, 1, 3, 1, 2, 2)])[None]
    # 1 1 _ 1 2 2 -> 1 1 2 (token 3 loses to the blank on e_3)
    assert head.greedy(frames, [6], vocab) == [[1, 1, 2]]
    assert head.greedy(frames, [2], vocab) == [[1]]


def test_model_ctc_targets_are_the_transcript_tokens_without_the_end(tokenizer_dir, monkeypatch):
    encoder, llm = make_tiny_parts(tokenizer_dir)
    model = SpeechLLM(encoder, MLPProjector(encoder.dim, llm.hidden_size, rate=2), llm, ctc=True)
    batch = tiny_batch()
    batch["task"] = ["asr", "st", "asr"]  # a translation's target is not what was said
    seen = {}

    def spy(frames, lengths, targets, vocab):
        seen.update(frames=frames, lengths=lengths, targets=targets, vocab=vocab)
        return frames.sum() * 0.0, 0

    monkeypatch.setattr(model.ctc, "loss", spy)
    projected = model.project(batch)
    model.ctc_loss(batch, projected)
    texts = [batch["texts"][0], batch["texts"][2]]
    assert seen["targets"] == [model.prompt.target(t)[:-1] for t in texts]
    assert model.prompt.end_id not in sum(seen["targets"], [])
    assert seen["lengths"] == [projected["audio"][1][i].item() for i in (0, 2)]
    assert seen["frames"].shape[0] == 2
    assert seen["vocab"] is llm.model.get_input_embeddings().weight


def test_ctc_gradient_trains_the_projector_and_head_not_the_llm(tokenizer_dir):
    encoder, llm = make_tiny_parts(tokenizer_dir)
    model = SpeechLLM(encoder, MLPProjector(encoder.dim, llm.hidden_size, rate=2), llm, ctc=True)
    loss, skipped = model.ctc_loss(tiny_batch(t=80))
    assert skipped == 0 and torch.isfinite(loss) and loss > 0
    loss.backward()
    grads = {n: p.grad for n, p in model.projector.named_parameters()}
    assert grads.pop("boundary") is None  # the begin/end vectors are not CTC frames
    assert all(g is not None and g.abs().sum() > 0 for g in grads.values())
    assert model.ctc.blank.grad is not None and model.ctc.log_scale.grad is not None
    assert all(p.grad is None for p in model.llm.parameters())


def test_model_without_head_refuses(tokenizer_dir):
    encoder, llm = make_tiny_parts(tokenizer_dir)
    factory = functools.partial(MLPProjector, rate=2)
    model = SpeechLLM(encoder, factory(encoder.dim, llm.hidden_size), llm)
    assert model.ctc is None
    with pytest.raises(ValueError, match="no CTC head"):
        model.ctc_loss(tiny_batch())


def test_shrink_keeps_the_first_frame_of_each_emitted_token():
    vocab = torch.eye(4)
    head = VocabCTC(4)
    with torch.no_grad():
        head.blank.copy_(torch.tensor([0.0, 0.0, 0.0, 2.0]))
        head.log_scale.zero_()
    picks = [1, 1, 3, 2, 3, 3, 0]  # 1 1 _ 2 _ _ 0 -> frames 0, 3, 6
    frames = torch.stack([torch.eye(4)[i] for i in picks])[None].requires_grad_()
    (kept,) = head.shrink(frames, [7], vocab)
    torch.testing.assert_close(kept, frames[0, [0, 3, 6]])
    kept.sum().backward()
    assert frames.grad[0, [0, 3, 6]].abs().sum() > 0 and frames.grad[0, [1, 2, 4, 5]].sum() == 0
    (short,) = head.shrink(frames.detach(), [3], vocab)  # 1 1 _ -> frame 0 only
    assert short.shape == (1, 4)


def test_shrink_of_an_all_blank_sample_keeps_its_least_blank_frame():
    vocab = torch.eye(4)
    head = VocabCTC(4)
    with torch.no_grad():
        head.blank.copy_(torch.tensor([0.0, 0.0, 0.0, 9.0]))
        head.log_scale.zero_()
    frames = torch.tensor([[[0.0, 0.0, 0.0, 1.0], [0.5, 0.0, 0.0, 0.6], [0.0, 0.0, 0.0, 1.0]]])
    (kept,) = head.shrink(frames, [3], vocab)
    torch.testing.assert_close(kept, frames[0, [1]])


def test_shrunk_spans_do_not_depend_on_batch_mates(tokenizer_dir):
    encoder, llm = make_tiny_parts(tokenizer_dir)
    torch.manual_seed(0)
    projector = MLPProjector(encoder.dim, llm.hidden_size, rate=2)
    model = SpeechLLM(encoder, projector, llm, ctc=True, ctc_shrink=True).eval()
    with torch.no_grad():
        model.ctc.log_scale.fill_(3.0)  # sharp logits: the path picks many tokens
    batch = tiny_batch(t=80)
    spans = model._spans(batch)
    frames = model.project(batch)["audio"][1].tolist()
    assert all(2 < len(s) <= n + 2 for s, n in zip(spans, frames, strict=True))
    assert len({len(s) for s in spans}) > 1 or spans[0].shape[0] < frames[0] + 2
    for i in range(3):
        alone = {k: v[i : i + 1] if torch.is_tensor(v) else v[i : i + 1] for k, v in batch.items()}
        n = int(batch["audio_lengths"][i])
        alone["audio_features"] = alone["audio_features"][..., :n]
        torch.testing.assert_close(model._spans(alone)[0], spans[i], rtol=1e-5, atol=1e-5)


def test_shrink_needs_a_ctc_head(tokenizer_dir):
    encoder, llm = make_tiny_parts(tokenizer_dir)
    with pytest.raises(ValueError, match="ctc_shrink"):
        SpeechLLM(encoder, MLPProjector(encoder.dim, llm.hidden_size), llm, ctc_shrink=True)


def test_embed_reads_the_posterior_weighted_token_embeddings():
    vocab = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, -1.0]])
    head = VocabCTC(2)
    with torch.no_grad():
        head.log_scale.fill_(4.0)  # sharp: a frame near token 1 reads as token 1's embedding
    frames = torch.tensor([[0.0, 1.0], [1.0, -1.0]], requires_grad=True)
    out = head.embed(frames, vocab)
    torch.testing.assert_close(out, vocab[[1, 0]], atol=1e-3, rtol=0)
    (out * torch.randn(2, 2)).sum().backward()  # the LLM loss reaches the projector
    assert frames.grad is not None


def test_embedded_spans_are_near_text(tokenizer_dir):
    encoder, llm = make_tiny_parts(tokenizer_dir)
    torch.manual_seed(0)
    projector = MLPProjector(encoder.dim, llm.hidden_size, rate=2)
    model = SpeechLLM(encoder, projector, llm, ctc=True, ctc_shrink=True, ctc_embed=True).eval()
    with torch.no_grad():
        model.ctc.log_scale.fill_(12.0)  # one-hot posteriors: each kept frame is its token
    vocab = llm.model.get_input_embeddings().weight
    batch = tiny_batch(t=80)
    (span, *_) = model._spans(batch)
    projected, lengths = model.project(batch)["audio"]
    (ids, *_) = model.ctc.greedy(projected, lengths.tolist(), vocab)
    torch.testing.assert_close(span[1:-1], vocab[ids], atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="ctc_embed"):
        SpeechLLM(encoder, projector, llm, ctc=True, ctc_embed=True)
