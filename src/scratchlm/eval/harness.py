"""lm-evaluation-harness on scratchlm checkpoints: the `scratchlm` model class, and lm-eval task
files for scratchlm's tasks.

    python -m scratchlm.eval run --model scratchlm --model_args path=runs/demo \\
        --tasks scratchlm_builtin_speaker --include_path TASKS_DIR

`ScratchLM` answers lm-eval's three requests (loglikelihood, loglikelihood_rolling,
generate_until) with scratchlm's own model, tokenizer and scoring (scratchlm.eval.loglik).
It is registered with lm-eval in both ways lm-eval finds models outside its tree: the
`lm_eval.models` entry point in scratchlm's package metadata (lm-eval's plugin discovery, so
`lm_eval --model scratchlm` works in releases that have it), and lm-eval's model registry when
this module is imported, which `python -m scratchlm.eval` does before it hands over to
lm-eval's own command line (for releases, such as 0.4.x, that discover no plugins).

Without lm-eval installed the class still imports and scores plain (context, continuation)
tuples; only the registration needs lm-eval.

`export_lm_eval_tasks` writes, for multiple-choice and generation tasks, a JSONL data file and
an lm-eval task YAML that formats and scores it as `scratchlm evaluate` does: each choice
appended to the context as is (`target_delimiter: ""`), few-shot examples from the task's own
examples without the scored one (`fewshot_split` = the test split), blank lines between them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

from scratchlm.errors import ScratchError
from scratchlm.eval.tasks import Task

try:
    from lm_eval.api.model import TemplateLM as _LMBase
except ImportError:  # lm-eval is optional (a dev dependency)
    _LMBase = object  # type: ignore[assignment,misc]

MODEL_NAME = "scratchlm"
TASK_PREFIX = "scratchlm_"


def _args(request) -> tuple:
    """An lm-eval Instance's arguments, or a plain tuple as is."""
    return tuple(request.args) if hasattr(request, "args") else tuple(request)


class ScratchLM(_LMBase):  # type: ignore[misc,valid-type]
    """A scratchlm model for lm-evaluation-harness. Arguments (`--model_args`): path (a run,
    model or Hugging Face directory), tokenizer (a directory, if not beside the model), device,
    batch_size (an integer; "auto" means 16), max_gen_toks (default 256, lm-eval's)."""

    backend = "causal"

    def __init__(self, path: str | None = None, tokenizer=None, device: str | None = None,
                 batch_size: int | str = 16, max_gen_toks: int = 256, model=None,
                 max_batch_size: int | None = None, **unknown) -> None:
        super().__init__()
        if unknown:
            raise ScratchError(f"model_args {sorted(unknown)} are not scratchlm's; it takes "
                               "path, tokenizer, device, batch_size, max_gen_toks")
        import torch

        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        if model is None:
            if path is None:
                raise ScratchError("give path=DIR in --model_args (a run, model or Hugging "
                                   "Face directory)")
            from scratchlm.model.load import load_pretrained

            model, tokenizer, _ = load_pretrained(path, device,
                                                  tokenizer if isinstance(tokenizer, str)
                                                  else None)
        elif tokenizer is None or isinstance(tokenizer, (str, os.PathLike)):
            raise ScratchError("a model object needs its tokenizer object as well")
        self.model, self.scratch_tokenizer, self.path = model.eval(), tokenizer, path
        self.batch_size = 16 if str(batch_size).startswith("auto") else int(batch_size)
        self.max_gen_toks = int(max_gen_toks)
        self._device = device

    # ----------------------------------------------------------------------------------------
    # what lm-eval asks of a causal model

    @property
    def eot_token_id(self) -> int:
        return self.scratch_tokenizer.eot_id

    @property
    def max_length(self) -> int:
        return self.model.config.block_size

    @property
    def device(self):
        return self._device

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **_) -> list[int]:
        return self.scratch_tokenizer.encode_batch([string], disallowed_special=())[0]

    def tok_decode(self, tokens: Sequence[int]) -> str:
        return self.scratch_tokenizer.decode(tokens)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **_
                              ) -> list[tuple[float, bool]]:
        from scratchlm.eval.loglik import score_pairs

        return score_pairs(self.model, [(ctx, cont) for _, ctx, cont in requests],
                           self.batch_size)

    def _cache(self, kind: str, requests, results: list) -> list:
        hook = getattr(self, "cache_hook", None)
        if hook is not None:
            for request, result in zip(requests, results):
                hook.add_partial(kind, _args(request), result)
        return results

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """(log p(continuation | context), is greedy) per (context, continuation); the text
        is split into tokens by scratchlm's own rule (scratchlm.eval.loglik.encode_pairs),
        not lm-eval's, so agreeing with lm-eval's `hf` model is a check on it."""
        from scratchlm.eval.loglik import encode_pairs, score_pairs

        pairs = encode_pairs(self.scratch_tokenizer, [_args(r) for r in requests])
        return self._cache("loglikelihood", requests,
                           score_pairs(self.model, pairs, self.batch_size))

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        from scratchlm.eval.loglik import rolling_loglikelihoods

        texts = [_args(r)[0] for r in requests]
        return self._cache("loglikelihood_rolling", requests, rolling_loglikelihoods(
            self.model, self.scratch_tokenizer, texts, self.batch_size))

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy continuations, stopped at <|endoftext|>, max_gen_toks or an `until`
        string; sampling is not supported (evaluation here is deterministic)."""
        from scratchlm.eval.loglik import greedy_answers

        contexts, until, budgets = [], [], []
        for request in requests:
            context, kwargs = _args(request)
            kwargs = dict(kwargs or {})
            if kwargs.get("do_sample") or float(kwargs.get("temperature") or 0.0) > 0:
                raise ScratchError("the scratchlm model class generates greedily only; set "
                                   "do_sample: false (temperature 0) in generation_kwargs")
            stops = kwargs.get("until") or []
            contexts.append(context)
            until.append([stops] if isinstance(stops, str) else list(stops))
            budgets.append(int(kwargs.get("max_gen_toks", kwargs.get("max_new_tokens",
                                                                     self.max_gen_toks))))
        return self._cache("generate_until", requests, greedy_answers(
            self.model, self.scratch_tokenizer, contexts, until, budgets, self.batch_size))

    def get_model_info(self) -> dict:
        from scratchlm.eval.evaluate import model_fingerprint

        return {"model_path": self.path, "model_fingerprint": model_fingerprint(self.model),
                "model_num_parameters": sum(p.numel() for p in self.model.parameters())}


def register() -> bool:
    """Put "scratchlm" into lm-eval's model registry (a lazy entry naming this class); False
    when lm-eval is not installed. Idempotent."""
    try:
        # lm-eval imports its own model table only into an empty registry (get_model), so it
        # must be there before ours.
        import lm_eval.models  # noqa: F401
        from lm_eval.api.registry import model_registry
    except ImportError:
        return False
    if MODEL_NAME not in model_registry:
        model_registry.register(MODEL_NAME, target="scratchlm.eval.harness:ScratchLM")
    return True


register()


# ------------------------------------------------------------------------------------------------
# lm-eval task files


def lm_eval_task_name(task: Task) -> str:
    return TASK_PREFIX + "".join(ch if ch.isalnum() else "_" for ch in task.name)


def _task_yaml(task: Task, name: str, data: Path) -> dict:
    spec = {"task": name, "dataset_path": "json",
            "dataset_kwargs": {"data_files": {"test": str(data.resolve())}},
            "test_split": "test", "fewshot_split": "test", "doc_to_text": "context",
            "target_delimiter": "", "fewshot_delimiter": "\n\n"}
    if task.kind == "multiple_choice":
        return {**spec, "output_type": "multiple_choice", "doc_to_choice": "choices",
                "doc_to_target": "gold", "metric_list": [
                    {"metric": m, "aggregation": "mean", "higher_is_better": True}
                    for m in ("acc", "acc_norm")]}
    first = task.examples[0]
    if any((e.until, e.max_new_tokens) != (first.until, first.max_new_tokens)
           for e in task.examples):
        raise ScratchError(f"task {task.name}: lm-eval takes one 'until' and one "
                           "'max_new_tokens' per task, and its lines differ")
    spec = {**spec, "output_type": "generate_until", "doc_to_target": "answer",
            "generation_kwargs": {"until": list(first.until), "do_sample": False,
                                  "temperature": 0.0, "max_gen_toks": first.max_new_tokens},
            "metric_list": [{"metric": "exact_match", "aggregation": "mean",
                             "higher_is_better": True, "ignore_case": True,
                             "ignore_punctuation": True}]}
    if task.extract is not None:  # lm-eval's regex filter: the first match, as ours
        spec["filter_list"] = [{"name": "extract", "filter": [
            {"function": "regex", "regex_pattern": f"({task.extract})", "group_select": 0},
            {"function": "take_first"}]}]
    return spec


def export_lm_eval_tasks(tasks: Sequence[Task], out_dir: str | Path) -> list[Path]:
    """For each multiple-choice or generation task: OUT/NAME.jsonl (its examples) and
    OUT/NAME.yaml (an lm-eval task over them). Returns the YAML paths."""
    import yaml

    from scratchlm.utils import atomic_write_text

    out = Path(out_dir)
    written = []
    for task in tasks:
        if task.kind == "perplexity":
            raise ScratchError(f"task {task.name}: perplexity tasks have no lm-eval export; "
                               "lm-eval's own wikitext-style tasks score text")
        name = lm_eval_task_name(task)
        rows = [{"context": e.context, "choices": list(e.choices), "gold": e.gold}
                if task.kind == "multiple_choice" else
                {"context": e.context, "answer": e.answers[0], "answers": list(e.answers)}
                for e in task.examples]
        data = atomic_write_text(out / f"{name}.jsonl",
                                 "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        written.append(atomic_write_text(out / f"{name}.yaml", yaml.dump(
            _task_yaml(task, name, data), Dumper=_dumper(), sort_keys=False,
            allow_unicode=True)))
    return written


def _quoted_newlines(dumper, text: str):
    """Strings with newlines as "\\n\\n" rather than YAML's folded single quotes."""
    return dumper.represent_scalar("tag:yaml.org,2002:str", text,
                                   style='"' if "\n" in text else None)


def _dumper():
    import yaml

    class Dumper(yaml.SafeDumper):
        pass

    Dumper.add_representer(str, _quoted_newlines)
    return Dumper
