"""Pretraining: the training loop, optimizer, schedule, metrics and checkpoints."""
