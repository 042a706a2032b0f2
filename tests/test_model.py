import torch
from conftest import tiny_batch

from mmalign.model import SpeechLLM
from mmalign.projectors.mlp import MLPProjector


def make_model(tiny_parts, loud: float = 1.0):
    """``loud`` scales the projector's output, so that a random tiny LLM's output depends on
    the audio (a decoding test that cannot tell samples apart proves nothing)."""
    encoder, llm = tiny_parts
    projector = MLPProjector(encoder.dim, llm.hidden_size, rate=2)
    with torch.no_grad():
        projector.net[-1].weight.mul_(loud)
    return SpeechLLM(encoder, projector, llm)


def batch(n=3, t=40):
    return tiny_batch(n, t, (0, 11, 20))


def test_loss_equals_full_logits_loss(tiny_parts):
    """Target-only logits give exactly the loss transformers computes from all logits."""
    model = make_model(tiny_parts)
    b = batch()
    s = model.splice_batch(b, train=True)
    full = model.llm.model(
        inputs_embeds=s.inputs_embeds, attention_mask=s.attention_mask, labels=s.labels
    ).loss
    torch.testing.assert_close(model(b), full)


def test_only_trainable_parts_get_gradients(tiny_parts):
    model = make_model(tiny_parts)
    model(batch()).backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, name
        else:
            assert p.grad is None, name


def test_batched_greedy_equals_one_by_one(tiny_parts):
    """Left padding must not change what greedy decoding produces for a sample."""
    model = make_model(tiny_parts, loud=30.0).eval()
    b = batch()
    together = model.generate(b, max_new_tokens=6)
    alone = []
    for i in range(3):
        one = {k: (v[i : i + 1] if torch.is_tensor(v) else v[i : i + 1]) for k, v in b.items()}
        one["audio_features"] = one["audio_features"][..., : int(b["audio_lengths"][i])]
        alone += model.generate(one, max_new_tokens=6)
    assert together == alone
    # and the comparison means something: outputs that depend on the audio, several tokens
    assert len(set(together)) > 1
    assert all(len(model.tokenizer(t)["input_ids"]) > 1 for t in together)


def test_token_budget_is_each_samples_own(tiny_parts):
    """A sample that never stops (a random LLM) ends at its own duration's budget, not at the
    longest batch mate's: its transcript does not depend on who it is decoded with."""
    model = make_model(tiny_parts, loud=30.0).eval()
    b = batch(2)
    b["durations"] = [0.5, 2.0]  # budgets of 2 x seconds + 16: 17 and 20 tokens
    together = model.generate(b, tokens_per_second=2.0)
    alone = []
    for i in range(2):
        one = {k: v[i : i + 1] for k, v in b.items()}
        one["audio_features"] = one["audio_features"][..., : int(b["audio_lengths"][i])]
        alone += model.generate(one, tokens_per_second=2.0)
    assert together == alone
    lengths = [len(model.tokenizer(t, add_special_tokens=False)["input_ids"]) for t in alone]
    assert lengths[0] < lengths[1]  # the budgets bit: neither sample stopped by itself


def first_step_logits(model: SpeechLLM, batch: dict) -> torch.Tensor:
    """Logits of the first generated token per sample, as generate() computes them."""
    from mmalign.llm.prompt import splice

    heads, tails = model._segments(batch)
    s = splice(model.llm.embed, heads, model._spans(batch), tails, padding_side="left")
    out = model.llm.model.generate(
        inputs_embeds=s.inputs_embeds,
        attention_mask=s.attention_mask,
        max_new_tokens=1,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
        pad_token_id=model.tokenizer.pad_token_id,
    )
    return out.logits[0]


def test_first_step_logits_alone_equal_those_in_a_mixed_length_batch(tiny_parts):
    encoder, llm = tiny_parts
    torch.manual_seed(0)
    model = SpeechLLM(encoder, MLPProjector(encoder.dim, llm.hidden_size, rate=2), llm).eval()
    batch = tiny_batch(3, 60, (0, 23, 41))  # lengths 60, 37, 19 frames
    with torch.no_grad():
        together = first_step_logits(model, batch)
        for i in range(3):
            n = int(batch["audio_lengths"][i])
            alone = {k: v[i : i + 1] for k, v in batch.items()}
            alone["audio_features"] = batch["audio_features"][i : i + 1, :, :n]
            logits = first_step_logits(model, alone)
            torch.testing.assert_close(logits[0], together[i], rtol=1e-4, atol=1e-4)


def test_loss_projects_only_the_labelled_positions(tiny_parts):
    """The vocabulary projection runs on the target tokens alone, and the loss is unchanged."""
    import torch.nn.functional as F

    from mmalign.llm.prompt import IGNORE_INDEX, splice

    encoder, llm = tiny_parts
    torch.manual_seed(0)
    model = SpeechLLM(encoder, MLPProjector(encoder.dim, llm.hidden_size, rate=2), llm)
    batch = tiny_batch(3, 60, (0, 23, 41))
    head = llm.model.get_base_model().get_output_embeddings()
    seen = []
    handle = head.register_forward_hook(lambda m, i, o: seen.append(tuple(i[0].shape)))
    loss = model(batch, reduction="sum")
    handle.remove()
    assert seen == [(model.target_tokens(batch), llm.hidden_size)]
    # the same as cross-entropy over full logits at every position
    heads, tails = model._segments(batch)
    targets = [model.prompt.target(t) for t in batch["texts"]]
    s = splice(llm.embed, heads, model._spans(batch), tails, targets)
    logits = llm.model(inputs_embeds=s.inputs_embeds, attention_mask=s.attention_mask).logits
    full = F.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(),
        s.labels[:, 1:].flatten(),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
    torch.testing.assert_close(loss, full, rtol=1e-5, atol=1e-5)


def test_loss_without_a_plain_head_takes_the_same_value(tiny_parts, monkeypatch):
    """Families that scale or cap logits go through the LLM's own forward: same loss."""
    from mmalign.llm import load

    encoder, llm = tiny_parts
    torch.manual_seed(0)
    model = SpeechLLM(encoder, MLPProjector(encoder.dim, llm.hidden_size, rate=2), llm)
    batch = tiny_batch(3, 60, (0, 23, 41))
    direct = model(batch)
    monkeypatch.setattr(load, "PLAIN_HEAD_FAMILIES", ())
    assert llm.body_and_head() is None
    torch.testing.assert_close(model(batch), direct, rtol=1e-5, atol=1e-6)
