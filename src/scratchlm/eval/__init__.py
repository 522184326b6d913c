"""Evaluation: perplexity and bits per byte; later, multiple-choice tasks and task metrics."""
