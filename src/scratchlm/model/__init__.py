"""The decoder-only transformer (GPT-2 and Llama families), KV cache and checkpoints."""

from scratchlm.model.config import PRESETS, ModelConfig

__all__ = ["GPT", "ModelConfig", "PRESETS"]


def __getattr__(name: str):
    # GPT is imported on first use, so that reading a config does not import torch.
    if name == "GPT":
        from scratchlm.model.gpt import GPT

        return GPT
    raise AttributeError(f"module 'scratchlm.model' has no attribute {name!r}")
