import pytest
import torch
from peft import LoraConfig

from mmalign.llm.load import CausalLM, split_source, torch_dtype


def test_random_llm_with_lora_trains_only_adapter(tokenizer_dir):
    from conftest import tiny_llm_config

    llm = CausalLM(
        "random",
        adapter=LoraConfig(r=2, target_modules=["q_proj"]),
        tokenizer=str(tokenizer_dir),
        config=tiny_llm_config(),
    )
    trainable = [n for n, p in llm.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert llm.hidden_size == 32
    assert llm.embed(torch.tensor([1, 2])).shape == (2, 32)


def test_random_needs_config_and_tokenizer():
    with pytest.raises(ValueError, match="config"):
        CausalLM("random")


def test_bad_dtype_and_missing_gguf(tmp_path):
    with pytest.raises(ValueError, match="dtype"):
        torch_dtype("float8")
    with pytest.raises(FileNotFoundError, match="nope.gguf"):
        split_source(str(tmp_path / "nope.gguf"))


def test_pinned_smollm2_gguf_loads_and_generates():
    """The pinned SmolLM2-135M-Instruct GGUF (installed by `make test`) dequantises and runs."""
    llm = CausalLM(
        "pinned:smollm2-135m-instruct", adapter=LoraConfig(r=4, target_modules=["q_proj"])
    )
    assert llm.hidden_size == 576
    tok = llm.tokenizer
    assert tok.chat_template and tok.eos_token == "<|im_end|>"
    ids = tok.apply_chat_template(
        [{"role": "user", "content": "What is 2+2?"}],
        add_generation_prompt=True,
        return_tensors="pt",
    )
    ids = ids["input_ids"] if not torch.is_tensor(ids) else ids
    out = llm.model.generate(ids, max_new_tokens=5, do_sample=False)
    assert out.shape[1] > ids.shape[1]
    # the dequantised weights are the real ones: English reads as likely, not as noise
    # (a random or wrongly dequantised model scores about ln(49152) = 10.8 nats a token)
    text = tok("The capital of France is Paris. It is a beautiful city.", return_tensors="pt")
    with torch.no_grad():
        loss = llm.model(input_ids=text["input_ids"], labels=text["input_ids"]).loss
    assert float(loss) < 4.0
    assert sum(p.numel() for p in llm.parameters() if p.requires_grad) == 30 * 4 * (576 + 576)
