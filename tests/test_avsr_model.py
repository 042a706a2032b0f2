"""Audio-visual SpeechLLM: per-task spans, encoders run only when needed, modality dropout."""

import pytest
import torch
from conftest import make_tiny_parts, tiny_batch, tiny_clip_config

from mmalign.encoders.clip_video import CLIPVideoEncoder
from mmalign.model import SpeechLLM
from mmalign.projectors.mlp import MLPProjector


def video_encoder() -> CLIPVideoEncoder:
    torch.manual_seed(1)
    return CLIPVideoEncoder(model="tiny", config=tiny_clip_config(), frame_rate=25.0)


def av_model(tokenizer_dir) -> SpeechLLM:
    encoder, llm = make_tiny_parts(tokenizer_dir)
    video = video_encoder()
    return SpeechLLM(
        encoder,
        MLPProjector(encoder.dim, llm.hidden_size, rate=2, hidden_dim=16),
        llm,
        video_encoder=video,
        video_projector=MLPProjector(video.dim, llm.hidden_size, rate=1, hidden_dim=16),
    )


def av_batch(tasks: list[str]) -> dict:
    b = tiny_batch(len(tasks))
    g = torch.Generator().manual_seed(0)
    b["video"] = torch.randint(0, 256, (len(tasks), 10, 1, 40, 40), generator=g, dtype=torch.uint8)
    b["video_lengths"] = torch.tensor([10, 7, 4][: len(tasks)])
    b["task"] = tasks
    return b


def test_spans_follow_each_samples_task(tokenizer_dir):
    model = av_model(tokenizer_dir).eval()
    lengths = {}
    for task in ("asr", "vsr", "avsr"):
        lengths[task] = [s.shape[0] for s in model._spans(av_batch([task] * 3))]
    # audio: ceil(40 / 2 / 2) = 10 (encoder stride 2, rate 2) + 2 boundaries; video: frames + 2
    assert lengths["vsr"] == [12, 9, 6]
    assert [a + v for a, v in zip(lengths["asr"], lengths["vsr"], strict=True)] == lengths["avsr"]
    mixed = [s.shape[0] for s in model._spans(av_batch(["asr", "vsr", "avsr"]))]
    assert mixed == [lengths["asr"][0], lengths["vsr"][1], lengths["avsr"][2]]
    # avsr puts audio first: its span starts with the audio projector's begin vector
    span = model._spans(av_batch(["avsr"]))[0]
    assert torch.equal(span[0], model.projector.begin.detach())
    assert torch.equal(span[lengths["asr"][0]], model.video_projector.begin.detach())


def test_encoders_run_only_for_needed_modalities(tokenizer_dir):
    model = av_model(tokenizer_dir).eval()
    vsr = av_batch(["vsr", "vsr"])
    del vsr["audio_features"], vsr["audio_lengths"]  # a video-only batch needs no audio
    assert set(model.encode(vsr)) == {"video"}
    assert len(model.generate(vsr, max_new_tokens=2)) == 2
    asr = av_batch(["asr"])
    del asr["video"], asr["video_lengths"]
    assert set(model.encode(asr)) == {"audio"}
    with pytest.raises(KeyError, match="video"):
        model.encode({**asr, "task": ["avsr"]})


def test_avsr_loss_trains_both_projectors(tokenizer_dir):
    model = av_model(tokenizer_dir)
    model(av_batch(["avsr"] * 3)).backward()
    for proj in (model.projector, model.video_projector):
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in proj.parameters())
    model.zero_grad()
    model(av_batch(["asr"] * 3)).backward()
    assert all(p.grad is None for p in model.video_projector.parameters())


def test_video_only_model_refuses_audio_tasks(tokenizer_dir):
    _, llm = make_tiny_parts(tokenizer_dir)
    video = video_encoder()
    model = SpeechLLM(video, MLPProjector(video.dim, llm.hidden_size, rate=1, hidden_dim=8), llm)
    assert model.modalities == ("video",)
    b = av_batch(["vsr", "vsr"])
    assert torch.isfinite(model(b))
    with pytest.raises(ValueError, match="data.task: vsr"):
        model({**b, "task": ["avsr", "avsr"]})


def test_bad_modality_setups_fail_at_construction(tokenizer_dir):
    encoder, llm = make_tiny_parts(tokenizer_dir)
    proj = MLPProjector(encoder.dim, llm.hidden_size, rate=2, hidden_dim=8)
    video = video_encoder()
    with pytest.raises(ValueError, match="come together"):
        SpeechLLM(encoder, proj, llm, video_encoder=video)
    with pytest.raises(ValueError, match="video_projector maps"):
        SpeechLLM(encoder, proj, llm, video_encoder=video, video_projector=proj)
    with pytest.raises(ValueError, match="task_modalities"):
        SpeechLLM(encoder, proj, llm, task_modalities={"x": ["smell"]})


def module(tokenizer_dir, **kwargs):
    from conftest import tiny_llm_config, tiny_whisper_config
    from peft import LoraConfig

    from mmalign.encoders.whisper import WhisperEncoder
    from mmalign.lightning_modules.alignment import AlignmentModule
    from mmalign.llm.load import CausalLM

    torch.manual_seed(0)

    def projector(i, o):
        return MLPProjector(i, o, rate=2, hidden_dim=8)

    return AlignmentModule(
        encoder=WhisperEncoder(source="random", config=tiny_whisper_config()),
        projector=projector,
        llm=CausalLM(
            "random",
            adapter=LoraConfig(r=2, target_modules=["q_proj"]),
            tokenizer=str(tokenizer_dir),
            config=tiny_llm_config(),
        ),
        video_encoder=video_encoder(),
        video_projector=projector,
        **kwargs,
    )


def test_modality_dropout_is_seeded_and_only_touches_avsr(tokenizer_dir):
    m = module(tokenizer_dir, modality_dropout={"asr": 0.3, "vsr": 0.3})
    tasks = ["avsr"] * 600 + ["asr"] * 10
    b = {"texts": ["x"] * len(tasks), "task": tasks}
    first = m.drop_modalities(b, 0)["task"]
    assert first == m.drop_modalities(b, 0)["task"]  # same (seed, step, batch): same draw
    assert first != m.drop_modalities(b, 1)["task"]
    assert first[600:] == ["asr"] * 10 and b["task"] == tasks  # input untouched
    counts = {t: first[:600].count(t) for t in ("avsr", "asr", "vsr")}
    expected = {"avsr": 0.4, "asr": 0.3, "vsr": 0.3}
    assert all(abs(counts[t] / 600 - p) < 0.08 for t, p in expected.items())
    assert m.drop_modalities(b, 0) is not b
    assert module(tokenizer_dir).drop_modalities(b, 0) is b
    with pytest.raises(ValueError, match="modality_dropout"):
        module(tokenizer_dir, modality_dropout={"asr": 0.7, "vsr": 0.5})
    with pytest.raises(ValueError, match="modality_dropout"):
        module(tokenizer_dir, modality_dropout={"text": 0.1})
