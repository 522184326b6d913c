"""scratchlm: build a large language model from scratch, end to end, in PyTorch."""

__version__ = "0.1.0"
