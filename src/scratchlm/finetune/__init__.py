"""Fine-tuning: classification, instruction following (SFT), LoRA."""
