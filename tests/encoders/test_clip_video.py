"""CLIPVideoEncoder: open_clip's image tower per frame, its own preprocessing, padding frames."""

from __future__ import annotations

import json

import open_clip
import pytest
import torch
from conftest import tiny_clip_config

from mmalign.components import build, spec
from mmalign.encoders.clip_video import CLIPVideoEncoder

LENGTHS = [5, 2]


def encoder(**kwargs) -> CLIPVideoEncoder:
    torch.manual_seed(0)
    return CLIPVideoEncoder("tiny-vit", config=tiny_clip_config(), **kwargs)


def video(channels: int = 1, size: int = 32) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.rand(2, max(LENGTHS), channels, size, size, generator=g)


def test_attributes():
    enc = encoder()
    assert (enc.dim, enc.frame_rate, enc.image_size) == (24, 25.0, (32, 32))
    assert enc.input_keys == ("video", "video_lengths") and enc.modality == "video"
    assert not any(p.requires_grad for p in enc.parameters())
    assert encoder(frame_rate=30).frame_rate == 30.0


def test_equals_open_clip_encode_image_with_its_constants(tmp_path):
    enc = encoder()
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": tiny_clip_config()}))
    # the same architecture as a whole open_clip model, given our tower's weights
    clip = open_clip.create_model(f"local-dir:{tmp_path}", pretrained_text=False)
    clip.visual.load_state_dict(enc.model.state_dict())
    clip.eval()
    x = video(channels=3)
    feats, lengths = enc(x, torch.tensor(LENGTHS))
    mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        ref = clip.encode_image((x[0, :5] - mean) / std)
    torch.testing.assert_close(feats[0, :5], ref, rtol=1e-5, atol=1e-5)
    assert lengths.tolist() == LENGTHS
    assert not feats[1, 2:].any()


def test_grayscale_uint8_and_chunks():
    enc = encoder(chunk_size=2)
    gray = (video(channels=1) * 255).round().to(torch.uint8)
    rgb = gray.expand(-1, -1, 3, -1, -1).float() / 255
    a, _ = enc(gray, torch.tensor(LENGTHS))
    b, _ = encoder(chunk_size=100)(rgb, torch.tensor(LENGTHS))
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_only_valid_frames_are_encoded_and_lip_crops_are_resized():
    enc = encoder(chunk_size=3)
    seen: list[int] = []
    enc.model.register_forward_hook(lambda m, i, o: seen.append(i[0].shape[0]))
    x = video(channels=1, size=88)  # LRS-style 88x88 lip crops, resized to 32
    x[1, 2:] = 1.0
    feats, _ = enc(x, torch.tensor(LENGTHS))
    assert seen == [3, 3, 1]  # 7 valid frames in chunks of 3
    x2 = x.clone()
    x2[1, 2:] = 0.0
    torch.testing.assert_close(enc(x2, torch.tensor(LENGTHS))[0], feats)


def test_lora_and_rebuild():
    from peft import LoraConfig

    enc = encoder(lora=LoraConfig(r=2, lora_alpha=4, target_modules=["c_fc"]))
    trainable = [n for n, p in enc.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    rebuilt = build(json.loads(json.dumps(spec(enc))))
    assert sorted(rebuilt.state_dict()) == sorted(enc.state_dict())
    feats, _ = enc(video(channels=3), torch.tensor(LENGTHS))
    feats.sum().backward()
    assert all(p.grad is not None for n, p in enc.named_parameters() if "lora_" in n)
    with pytest.raises(ValueError, match="never run"):  # nn.MultiheadAttention's out_proj
        encoder(lora=LoraConfig(r=2, target_modules=["out_proj"]))


def test_bad_inputs_name_the_problem():
    enc = encoder()
    with pytest.raises(ValueError, match="B, Tv, C, H, W"):
        enc(torch.zeros(2, 3, 32, 32), torch.tensor([1, 1]))
    with pytest.raises(ValueError, match="channels"):
        enc(torch.zeros(1, 2, 2, 32, 32), torch.tensor([2]))
    with pytest.raises(FileNotFoundError, match="pretrained"):
        CLIPVideoEncoder("ViT-B-16", pretrained="/nonexistent.pt")
