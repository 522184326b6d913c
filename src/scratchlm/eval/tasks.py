"""Evaluation tasks: what `scratchlm evaluate --tasks` names, read and checked before any model
runs.

A task is one of three kinds:

- multiple choice: JSONL lines `{"context": str, "choices": [str, ...], "gold": int}`; each
  choice is appended to the context as it is (put a leading space in the choices, or end the
  context with one: lm-eval moves trailing whitespace of the context into the continuation, and
  so do we), and scored by its log-likelihood;
- generation: JSONL lines `{"context": str, "answer": str}` (or `"answers": [str, ...]`, any of
  which counts), optionally `"until": [str, ...]` (stop strings, default a newline) and
  `"max_new_tokens": int` (default 32); the greedy continuation is scored by exact match and
  token F1 against the best-matching answer;
- perplexity: a plain text file (.txt, .md, .text): loss, perplexity and bits per byte.

`builtin:NAME` names a task built from the built-in corpus (see scratchlm.eval.builtin).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

from scratchlm.errors import ScratchError

Kind = Literal["multiple_choice", "generation", "perplexity"]
TEXT_SUFFIXES = (".txt", ".md", ".text")
DEFAULT_UNTIL = ("\n",)
DEFAULT_MAX_NEW_TOKENS = 32


@dataclass(frozen=True)
class MCExample:
    context: str
    choices: tuple[str, ...]
    gold: int


@dataclass(frozen=True)
class GenExample:
    context: str
    answers: tuple[str, ...]
    until: tuple[str, ...] = DEFAULT_UNTIL
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS


@dataclass
class Task:
    name: str
    kind: Kind
    examples: list = field(default_factory=list)  # MCExample or GenExample, in file order
    text: str = ""  # perplexity tasks: the text scored
    extract: str | None = None
    """Generation: a regex whose first match in the greedy output is the answer (lm-eval's
    `regex` filter); None = the whole output, stripped."""
    source: str = ""  # where the task came from: a path, or a description of a built-in

    def fingerprint(self) -> str:
        """A short hash of everything that decides the task's scores."""
        blob = json.dumps({"kind": self.kind, "examples": [asdict(e) for e in self.examples],
                           "text": self.text, "extract": self.extract}, sort_keys=True)
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


# ------------------------------------------------------------------------------------------------
# JSONL task files


def _text_field(row: dict, key: str, where: str, allow_empty: bool = True) -> str:
    value = row.get(key)
    if not isinstance(value, str):
        raise ScratchError(f"{where}: field {key!r} must be a string, got "
                           f"{type(value).__name__}; see `scratchlm evaluate --help`")
    if not allow_empty and not value:
        raise ScratchError(f"{where}: field {key!r} is empty; give it text")
    return value


def _context(row: dict, where: str, allow_empty: bool) -> str:
    context = _text_field(row, "context", where, allow_empty)
    if context and not context.strip():
        # lm-eval would move all of it into the continuation and score the first token with
        # no context at all.
        raise ScratchError(f"{where}: the context is only whitespace; leave it empty (the "
                           "choices are then scored after <|endoftext|>) or give it text")
    return context


def _mc_example(row: dict, where: str) -> MCExample:
    context = _context(row, where, allow_empty=True)
    choices = row.get("choices")
    if not isinstance(choices, list) or len(choices) < 2:
        raise ScratchError(f"{where}: field 'choices' must be a list of at least two strings")
    for i, choice in enumerate(choices):
        if not isinstance(choice, str) or not choice.strip():
            raise ScratchError(f"{where}: choice {i} is empty or not a string; every choice "
                               "needs text to score")
    gold = row.get("gold")
    if not isinstance(gold, int) or isinstance(gold, bool):
        raise ScratchError(f"{where}: field 'gold' must be the index of the right choice (an "
                           f"integer), got {gold!r}")
    if not 0 <= gold < len(choices):
        raise ScratchError(f"{where}: gold index {gold} is out of range for {len(choices)} "
                           f"choices; it must be 0..{len(choices) - 1}")
    return MCExample(context, tuple(choices), gold)


def _gen_example(row: dict, where: str) -> GenExample:
    context = _context(row, where, allow_empty=False)
    answers = row["answers"] if "answers" in row else [row.get("answer")]
    if not isinstance(answers, list) or not answers or \
            not all(isinstance(a, str) and a.strip() for a in answers):
        raise ScratchError(f"{where}: 'answer' must be a non-empty string ('answers' a list of "
                           "them)")
    until = row.get("until", list(DEFAULT_UNTIL))
    if not isinstance(until, list) or not all(isinstance(u, str) and u for u in until):
        raise ScratchError(f"{where}: 'until' must be a list of non-empty stop strings")
    max_new = row.get("max_new_tokens", DEFAULT_MAX_NEW_TOKENS)
    if not isinstance(max_new, int) or isinstance(max_new, bool) or max_new < 1:
        raise ScratchError(f"{where}: 'max_new_tokens' must be a positive integer, got "
                           f"{max_new!r}")
    return GenExample(context, tuple(answers), tuple(until), max_new)


def read_jsonl_task(path: str | Path) -> Task:
    """A multiple-choice or generation task from a JSONL file, every line checked."""
    path = Path(path)
    if not path.is_file():
        raise ScratchError(f"{path}: no such task file; check the path")
    kind: Kind | None = None
    examples: list = []
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            where = f"{path}:{n}"
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ScratchError(f"{where}: not valid JSON ({e.msg}); each line must be one "
                                   "JSON object") from None
            if not isinstance(row, dict):
                raise ScratchError(f"{where}: each line must be a JSON object")
            row_kind: Kind = "multiple_choice" if "choices" in row else "generation" \
                if "answer" in row or "answers" in row else None  # type: ignore[assignment]
            if row_kind is None:
                raise ScratchError(f"{where}: neither 'choices' (multiple choice) nor "
                                   "'answer' (generation); see `scratchlm evaluate --help`")
            if kind is not None and row_kind != kind:
                raise ScratchError(f"{where}: a {row_kind.replace('_', ' ')} line in a "
                                   f"{kind.replace('_', ' ')} task; one kind per file")
            kind = row_kind
            examples.append(_mc_example(row, where) if kind == "multiple_choice"
                            else _gen_example(row, where))
    if kind is None:
        raise ScratchError(f"{path}: the task file has no examples")
    return Task(path.stem, kind, examples, source=str(path))


def read_text_task(path: str | Path) -> Task:
    path = Path(path)
    if not path.is_file():
        raise ScratchError(f"{path}: no such text file; check the path")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ScratchError(f"{path}: not valid UTF-8 at byte offset {e.start}; convert it to "
                           "UTF-8") from None
    if not text.strip():
        raise ScratchError(f"{path}: the text file is empty; nothing to score")
    return Task(path.stem, "perplexity", text=text, source=str(path))


# ------------------------------------------------------------------------------------------------
# names on the command line


def resolve_task(spec: str) -> Task:
    """`builtin:NAME`, a .jsonl task file or a text file -> the task."""
    if spec.startswith("builtin:"):
        from scratchlm.eval.builtin import builtin_task

        return builtin_task(spec.split(":", 1)[1])
    path = Path(spec)
    if path.suffix.lower() == ".jsonl":
        return read_jsonl_task(path)
    if path.suffix.lower() in TEXT_SUFFIXES:
        return read_text_task(path)
    raise ScratchError(f"task {spec!r}: expected builtin:NAME, a .jsonl task file or a text "
                       f"file ({', '.join(TEXT_SUFFIXES)})")


def resolve_tasks(specs: str | Sequence[str | Task]) -> list[Task]:
    """Tasks from "T1,T2" or a list of names and Task objects; `builtin` alone is every
    built-in task. Repeated names are an error (their results would overwrite each other)."""
    from scratchlm.eval.builtin import BUILTIN_TASKS

    items = [s.strip() for s in specs.split(",")] if isinstance(specs, str) else list(specs)
    tasks: list[Task] = []
    for item in items:
        if isinstance(item, Task):
            tasks.append(item)
        elif item == "builtin":
            tasks += [resolve_task(f"builtin:{name}") for name in BUILTIN_TASKS]
        elif item:
            tasks.append(resolve_task(item))
    if not tasks:
        raise ScratchError("no tasks given; pass --tasks builtin or task names, e.g. "
                           "--tasks builtin:speaker,my_task.jsonl")
    names = [t.name for t in tasks]
    if len(set(names)) != len(names):
        twice = sorted({n for n in names if names.count(n) > 1})
        raise ScratchError(f"task name(s) {twice} given twice; rename one of the files")
    return tasks
