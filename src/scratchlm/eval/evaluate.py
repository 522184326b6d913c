"""`scratchlm evaluate`: a model on a set of tasks, as lm-evaluation-harness would score it.

`evaluate_tasks(model, tokenizer, tasks, ...)` is the one entry point, for the command line
and for periodic evaluation from a training loop: it takes a model in memory and returns the
results as a dict (JSON-ready), which `results_table` renders as Markdown.

Metrics, as lm-eval defines them:
- multiple choice: `acc` — the choice with the highest summed log-likelihood is the gold one;
  `acc_norm` — the same after dividing each log-likelihood by the choice's length in
  characters (lm-eval's `acc_norm`; its byte-length variant is `acc_bytes`). Ties go to the
  first choice (numpy's argmax);
- generation: `exact_match` and `token_f1` (scratchlm.eval.metrics, SQuAD's normalisation),
  the best over an example's answers;
- each mean comes with its standard error, the sample standard deviation (n - 1) over
  sqrt(n), lm-eval's `mean_stderr`;
- perplexity tasks: loss (nats/token), perplexity and bits per byte (scratchlm.eval.perplexity).

Few-shot examples come from the task's own examples, never the one being scored, drawn as
lm-eval draws them for a task whose few-shot split is its test split: one random.Random(seed)
per task (lm-eval's default seed 1234), n + 1 examples sampled per scored example in order,
the scored one removed, the first n kept; each shown as context + gold answer, separated by
blank lines.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from scratchlm.errors import ScratchError
from scratchlm.eval.tasks import GenExample, MCExample, Task, resolve_tasks
from scratchlm.model.gpt import GPT

FEWSHOT_SEED = 1234  # lm-eval's default fewshot_random_seed
FEWSHOT_DELIMITER = "\n\n"  # lm-eval's default fewshot_delimiter


# ------------------------------------------------------------------------------------------------
# fingerprints


def model_fingerprint(model: torch.nn.Module) -> str:
    """A short hash of every tensor (name, dtype, shape, bytes): the same weights, the same
    fingerprint, wherever they were loaded from."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def tokenizer_fingerprint(tokenizer) -> str:
    blob = json.dumps(tokenizer.to_dict(), sort_keys=True)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


# ------------------------------------------------------------------------------------------------
# few-shot prompts and statistics


def _answer(example: MCExample | GenExample) -> str:
    return example.choices[example.gold] if isinstance(example, MCExample) \
        else example.answers[0]


def fewshot_contexts(examples: Sequence[MCExample | GenExample], shots: int, n_scored: int,
                     seed: int = FEWSHOT_SEED) -> list[str]:
    """The prompt of each of the first `n_scored` examples, with `shots` solved examples
    before it (see the module docstring for how they are drawn)."""
    if shots == 0:
        return [e.context for e in examples[:n_scored]]
    if shots >= len(examples):
        raise ScratchError(f"--shots {shots} needs at least {shots + 1} examples in the task, "
                           f"which has {len(examples)}")
    rng = random.Random(seed)
    pool = list(examples)
    contexts = []
    for example in examples[:n_scored]:
        drawn = [e for e in rng.sample(pool, shots + 1) if e != example][:shots]
        if len(drawn) < shots:  # copies of the example were drawn: draw again without them
            drawn = rng.sample([e for e in pool if e != example], shots)
        shown = FEWSHOT_DELIMITER.join(e.context + _answer(e) for e in drawn)
        contexts.append(shown + FEWSHOT_DELIMITER + example.context)
    return contexts


def mean_stderr(values: Sequence[float]) -> tuple[float, float | None]:
    """(mean, standard error of the mean); the error is absent for fewer than two values."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, None
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)


def _with_stderr(metrics: dict[str, list[float]]) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for name, values in metrics.items():
        out[name], out[f"{name}_stderr"] = mean_stderr(values)
    return out


def _argmax(values: Sequence[float]) -> int:
    return max(range(len(values)), key=lambda i: (values[i], -i))  # first of equals wins


# ------------------------------------------------------------------------------------------------
# one task of each kind


def _multiple_choice(model: GPT, tokenizer, task: Task, contexts: list[str], batch_size: int,
                     log_samples: bool) -> dict:
    from scratchlm.eval.loglik import encode_pairs, score_pairs

    examples = task.examples[:len(contexts)]
    requests = [(ctx, choice) for ctx, e in zip(contexts, examples) for choice in e.choices]
    scores = iter(score_pairs(model, encode_pairs(tokenizer, requests), batch_size))
    acc, acc_norm, samples = [], [], []
    for e in examples:
        lls = [next(scores)[0] for _ in e.choices]
        pred = _argmax(lls)
        pred_norm = _argmax([ll / len(c) for ll, c in zip(lls, e.choices)])
        acc.append(float(pred == e.gold))
        acc_norm.append(float(pred_norm == e.gold))
        samples.append({"loglikelihoods": lls, "pred": pred, "pred_norm": pred_norm,
                        "gold": e.gold})
    out = {"metrics": _with_stderr({"acc": acc, "acc_norm": acc_norm}),
           "chance": sum(1 / len(e.choices) for e in examples) / len(examples)}
    if log_samples:
        out["samples"] = samples
    return out


def _extract(text: str, pattern: str | None) -> str:
    import re

    if pattern is None:
        return text.strip()
    m = re.search(pattern, text)
    return m.group(0) if m else ""


def _generation(model: GPT, tokenizer, task: Task, contexts: list[str], batch_size: int,
                log_samples: bool) -> dict:
    from scratchlm.eval.loglik import greedy_answers
    from scratchlm.eval.metrics import exact_match, normalize_answer, token_f1

    examples: list[GenExample] = task.examples[:len(contexts)]
    outputs = greedy_answers(model, tokenizer, contexts, [e.until for e in examples],
                             [e.max_new_tokens for e in examples], batch_size)
    em, f1, samples = [], [], []
    for e, output in zip(examples, outputs):
        answer = _extract(output, task.extract)
        em.append(max(exact_match(answer, a) for a in e.answers))
        f1.append(max(token_f1(answer, a) for a in e.answers))
        samples.append({"output": output, "answer": answer, "references": list(e.answers)})
    # The baseline a model must beat: always giving the most frequent reference answer.
    common = Counter(normalize_answer(e.answers[0]) for e in examples).most_common(1)[0][0]
    baseline = sum(max(exact_match(common, a) for a in e.answers) for e in examples) \
        / len(examples)
    out = {"metrics": _with_stderr({"exact_match": em, "token_f1": f1}),
           "baseline": baseline, "baseline_answer": common}
    if log_samples:
        out["samples"] = samples
    return out


def _perplexity(model: GPT, tokenizer, task: Task, batch_size: int) -> dict:
    from scratchlm.eval.perplexity import evaluate_text

    device = str(next(model.parameters()).device)
    return {"metrics": evaluate_text(model, tokenizer, task.text, batch_size=batch_size,
                                     device=device)}


# ------------------------------------------------------------------------------------------------
# the entry point


def evaluate_tasks(model: GPT, tokenizer, tasks: str | Sequence[str | Task], shots: int = 0,
                   limit: int | None = None, batch_size: int = 16, seed: int = FEWSHOT_SEED,
                   log_samples: bool = False, model_path: str | None = None,
                   progress: Callable[[str], None] | None = None) -> dict:
    """Evaluate `model` (any device; left in the mode it came in) on `tasks` ("T1,T2", or a
    list of names and Task objects). `limit` scores only the first N examples of each
    multiple-choice and generation task; `shots` solved examples precede each one. Returns
    {"model", "tokenizer", "settings", "tasks": {name: {"kind", "examples", "fingerprint",
    "metrics", ...}}, "seconds"}."""
    if shots < 0:
        raise ScratchError(f"--shots must be >= 0, got {shots}")
    if limit is not None and limit < 1:
        raise ScratchError(f"--limit must be >= 1, got {limit}")
    if batch_size < 1:
        raise ScratchError(f"--batch-size must be >= 1, got {batch_size}")
    if tokenizer.vocab_size > model.config.vocab_size:
        raise ScratchError(f"the tokenizer has {tokenizer.vocab_size:,} tokens but the model "
                           f"only {model.config.vocab_size:,}; they do not belong together")
    resolved = resolve_tasks(tasks)
    start = time.perf_counter()
    results: dict = {}
    for task in resolved:
        t0 = time.perf_counter()
        n = len(task.examples) if limit is None else min(limit, len(task.examples))
        entry: dict = {"kind": task.kind, "fingerprint": task.fingerprint(),
                       "source": task.source}
        if task.kind == "perplexity":
            entry.update(_perplexity(model, tokenizer, task, batch_size))
        else:
            contexts = fewshot_contexts(task.examples, shots, n, seed)
            run = _multiple_choice if task.kind == "multiple_choice" else _generation
            entry["examples"] = n
            entry.update(run(model, tokenizer, task, contexts, batch_size, log_samples))
        entry["seconds"] = time.perf_counter() - t0
        results[task.name] = entry
        if progress:
            progress(f"[evaluate] {task.name}: {_summary(entry)} ({entry['seconds']:.1f} s)")
    return {
        "model": {"path": model_path, "fingerprint": model_fingerprint(model),
                  "parameters": sum(p.numel() for p in model.parameters()),
                  "config": model.config.to_dict()},
        "tokenizer": {"fingerprint": tokenizer_fingerprint(tokenizer),
                      "vocab_size": tokenizer.vocab_size},
        "settings": {"shots": shots, "limit": limit, "fewshot_seed": seed,
                     "batch_size": batch_size},
        "tasks": results,
        "seconds": time.perf_counter() - start,
    }


# ------------------------------------------------------------------------------------------------
# reporting

_SHOWN = {"multiple_choice": ("acc", "acc_norm"), "generation": ("exact_match", "token_f1"),
          "perplexity": ("bpb", "ppl", "loss")}


def _summary(entry: dict) -> str:
    m = entry["metrics"]
    return ", ".join(f"{k} {m[k]:.4f}" for k in _SHOWN[entry["kind"]])


def results_table(results: dict) -> str:
    """The results as a Markdown table: one row per task and metric, with its standard error
    and what chance (multiple choice) or the most frequent answer (generation) scores."""
    lines = ["| task | kind | n | metric | value | ± stderr | chance / baseline |",
             "|---|---|---:|---|---:|---:|---:|"]
    for name, entry in results["tasks"].items():
        m = entry["metrics"]
        first = [name, entry["kind"], str(entry.get("examples", m.get("tokens")))]
        for i, metric in enumerate(_SHOWN[entry["kind"]]):
            err = m.get(f"{metric}_stderr")
            # chance is per-choice accuracy; the baseline is the most frequent answer's EM
            ref = entry.get("chance") if entry["kind"] == "multiple_choice" else \
                entry.get("baseline") if metric == "exact_match" else None
            cells = (first if i == 0 else ["", "", ""]) + [
                metric, f"{m[metric]:.4f}", "" if err is None else f"{err:.4f}",
                "" if ref is None else f"{ref:.4f}"]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_results(results: dict, path: str | Path) -> tuple[Path, Path]:
    """results.json and the Markdown table beside it (results.md), each written atomically."""
    from scratchlm.utils import atomic_write_text

    path = Path(path)
    table = path.with_suffix(".md")
    atomic_write_text(path, json.dumps(results, indent=2))
    atomic_write_text(table, results_table(results) + "\n")
    return path, table


def evaluate_demo_model(model_dir: str | Path, out: str | Path, limit: int | None = 100,
                        progress: bool = True) -> Path:
    """The demo's evaluation step: the built-in tasks (each at most `limit` examples; the
    held-out perplexity on every held-out token) for the model in `model_dir` (a run or model
    directory), written to `out` (results.json, results.md beside it). Returns the .md path.
    Zero-shot, so any model can be scored; chance is in the table."""
    import sys

    from scratchlm.eval.builtin import held_out_warning
    from scratchlm.model.load import load_pretrained

    model, tok, directory = load_pretrained(model_dir)
    results = evaluate_tasks(model, tok, "builtin", limit=limit, model_path=str(model_dir),
                             progress=(lambda line: print(line, file=sys.stderr))
                             if progress else None)
    warning = held_out_warning(directory)
    if warning:
        results["warnings"] = [warning]
    return write_results(results, out)[1]
