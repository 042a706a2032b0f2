import torch
from conftest import tiny_batch

from mmalign.model import SpeechLLM
from mmalign.projectors.mlp import MLPProjector


def make_model(tiny_parts):
    encoder, llm = tiny_parts
    return SpeechLLM(encoder, MLPProjector(encoder.dim, llm.hidden_size, rate=2), llm)


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
    model = make_model(tiny_parts).eval()
    b = batch()
    together = model.generate(b, max_new_tokens=6)
    alone = []
    for i in range(3):
        one = {k: (v[i : i + 1] if torch.is_tensor(v) else v[i : i + 1]) for k, v in b.items()}
        one["audio_features"] = one["audio_features"][..., : int(b["audio_lengths"][i])]
        alone += model.generate(one, max_new_tokens=6)
    assert together == alone
