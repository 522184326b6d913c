"""Evaluation: perplexity and bits per byte, multiple-choice log-likelihood and generation
tasks scored as lm-evaluation-harness scores them (`evaluate_tasks`), built-in tasks from the
built-in corpus, answer metrics, and an lm-evaluation-harness model class (harness.py)."""
