"""The decoder-only transformer (GPT-2 and Llama families), KV cache and checkpoints."""

from scratchlm.model.config import PRESETS, ModelConfig
from scratchlm.model.gpt import GPT

__all__ = ["GPT", "ModelConfig", "PRESETS"]
