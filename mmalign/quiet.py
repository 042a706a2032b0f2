"""Third-party notices a user of mmalign cannot act on, each silenced by its exact text, with why.

Only messages understood to be harmless are listed; anything else still reaches the user. The CLI
calls :func:`silence` at start-up and the test suite calls it in every test, so both see the same.
"""

from __future__ import annotations

import logging
import warnings

__all__ = ["silence"]

# (category, message regex, module regex or "", why it is harmless)
WARNINGS: list[tuple[type[Warning], str, str, str]] = [
    (
        UserWarning,
        r"`loftq_config` specified but will be ignored",
        r"peft\.",
        "jsonargparse fills LoraConfig's default loftq_config with an empty LoftQConfig(), which "
        "peft drops again (init_lora_weights 'loftq' itself is refused by mmalign.llm.tuners)",
    ),
    (
        FutureWarning,
        r"`is_gradient_checkpointing` is deprecated",
        r"transformers\.",
        "peft 0.21 reads transformers' deprecated alias when wrapping a model; same value",
    ),
    (
        Warning,
        r"`isinstance\(treespec, LeafSpec\)` is deprecated",
        r"lightning\.",
        "Lightning 2.6's batch-size lookup uses torch's old pytree API; behaviour unchanged",
    ),
    (
        Warning,
        r"Found \d+ module\(s\) in eval mode at the start of training",
        r"lightning\.",
        "frozen encoders and LLM stay in eval mode on purpose (dropout off, see Encoder.lock)",
    ),
    (
        Warning,
        r"Precision bf16-mixed is not supported by the model summary",
        r"lightning\.",
        "only the summary's size estimate is affected; mmalign prints the trainable count itself",
    ),
    (
        Warning,
        r"(?s).*(skip_none parameter|add_instantiator|instantiate_classes|only one Jsonargparse)",
        r"lightning\.",
        "Lightning 2.6's CLI calls jsonargparse APIs that stay until jsonargparse 5 (pinned <5)",
    ),
    (
        UserWarning,
        r"Support for mismatched key_padding_mask and attn_mask is deprecated",
        r"torch\.",
        "transformers' WavLM attention passes a float position bias beside a bool padding mask",
    ),
    (
        DeprecationWarning,
        r"`torch\.jit\.script_method` is deprecated",
        r"torch\.",
        "raised while transformers/open_clip import modules that define TorchScript methods",
    ),
]

# Lightning's info-level advertisements for its hosted services ("💡 Tip: ... litlogger/litmodels").
_LOG_NOISE = ("💡 Tip:",)
_LOGGERS = ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero")


class _DropTips(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(_LOG_NOISE)


_TIPS = _DropTips()


def silence() -> None:
    """Install the filters above (idempotent: warnings and logging both de-duplicate them)."""
    for category, message, module, _why in WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)
    for name in _LOGGERS:
        logging.getLogger(name).addFilter(_TIPS)
