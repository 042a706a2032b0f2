import pytest
import torch

from mmalign.projectors.compress import compress, compressed_lengths
from mmalign.projectors.mlp import MLPProjector


def test_stack_shapes_and_order():
    x = torch.arange(2 * 5 * 3, dtype=torch.float).reshape(2, 5, 3)
    lengths = torch.tensor([5, 3])
    y, n = compress(x, lengths, rate=2, mode="stack")
    assert y.shape == (2, 3, 6)
    assert n.tolist() == [3, 2]
    assert torch.equal(y[0, 0], torch.cat([x[0, 0], x[0, 1]]))
    # frame 3 of sample 1 is padding: it must be zeroed, not leak into group 1
    assert torch.equal(y[1, 1], torch.cat([x[1, 2], torch.zeros(3)]))


def test_avgpool_divides_by_valid_frames():
    x = torch.ones(1, 5, 2)
    y, n = compress(x, torch.tensor([5]), rate=4, mode="avgpool")
    assert y.shape == (1, 2, 2)
    assert n.tolist() == [2]
    assert torch.allclose(y, torch.ones(1, 2, 2))  # last group has 1 valid frame of value 1


def test_rate_one_is_identity_on_valid_frames():
    x = torch.randn(2, 4, 3)
    y, n = compress(x, torch.tensor([4, 4]), 1)
    assert torch.equal(y, x) and n.tolist() == [4, 4]


def test_compressed_lengths():
    assert compressed_lengths(torch.tensor([0, 1, 4, 5, 8]), 4).tolist() == [0, 1, 1, 2, 2]


@pytest.mark.parametrize("mode,rate", [("stack", 3), ("avgpool", 2)])
def test_mlp_projector_shapes(mode, rate):
    p = MLPProjector(16, 32, rate=rate, mode=mode, hidden_dim=24)
    y, n = p(torch.randn(3, 10, 16), torch.tensor([10, 7, 1]))
    assert y.shape == (3, -(-10 // rate), 32)
    assert n.tolist() == [-(-10 // rate), -(-7 // rate), 1]
    assert p.begin.shape == (32,) and p.boundary.requires_grad


def test_bad_settings_fail_at_construction():
    with pytest.raises(ValueError, match="compression mode"):
        MLPProjector(4, 4, mode="conv")
    with pytest.raises(ValueError, match="rate"):
        MLPProjector(4, 4, rate=0)
    with pytest.raises(ValueError, match="activation"):
        MLPProjector(4, 4, activation="nope")
