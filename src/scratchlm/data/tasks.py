"""Tasks derived from the built-in corpus, so that every stage after pretraining runs offline on
a CPU with a model this project pretrained.

They are split by play: no play is in two splits, so a model is tested on plays whose
characters, places and plots it was not fine-tuned on. Plays are assigned to splits per genre
(each split holds plays of every genre) by a seeded shuffle.
"""

from __future__ import annotations

import random
from collections import defaultdict

from scratchlm.data.builtin import Scene, iter_scenes
from scratchlm.errors import ScratchError

# The First Folio's three kinds: the problem plays and late romances are comedies in it
# (Cymbeline aside), the Roman plays tragedies.
GENRE_CLASS = {"comedies": "comedy", "problems": "comedy", "romances": "comedy",
               "histories": "history", "tragedies": "tragedy", "roman": "tragedy"}
SPLITS = ("train", "val", "test")


def play_splits(seed: int = 0, fractions: tuple[float, float, float] = (0.7, 0.1, 0.2)
                ) -> dict[str, str]:
    """{play title: "train" | "val" | "test"}, each genre's plays split by `fractions` (val and
    test get at least one play of each genre)."""
    by_genre: dict[str, list[str]] = defaultdict(list)
    for scene in iter_scenes():
        plays = by_genre[GENRE_CLASS[scene.genre]]
        if scene.play not in plays:
            plays.append(scene.play)
    split: dict[str, str] = {}
    for genre in sorted(by_genre):
        plays = sorted(by_genre[genre])
        random.Random(f"{seed}-{genre}").shuffle(plays)
        n_test = max(1, round(fractions[2] * len(plays)))
        n_val = max(1, round(fractions[1] * len(plays)))
        for i, play in enumerate(plays):
            split[play] = "test" if i < n_test else "val" if i < n_test + n_val else "train"
    return split


def scenes_by_split(seed: int = 0) -> dict[str, list[Scene]]:
    splits = play_splits(seed)
    out: dict[str, list[Scene]] = {s: [] for s in SPLITS}
    for scene in iter_scenes():
        out[splits[scene.play]].append(scene)
    return out


def genre_task(seed: int = 0) -> dict[str, list[tuple[str, str]]]:
    """builtin:genre: (scene text, comedy | history | tragedy) per split."""
    return {split: [(s.text, GENRE_CLASS[s.genre]) for s in scenes]
            for split, scenes in scenes_by_split(seed).items()}


BUILTIN_CLASSIFY = {"genre": genre_task}


# ------------------------------------------------------------------------------------------------
# instruction tasks (SFT): Alpaca-style records, split by play


def speeches(scene: Scene) -> list[tuple[str, list[str]]]:
    """(speaker, lines) of each speech of a scene, in order; stage directions left out, and a
    speech interrupted by one continued."""
    out: list[tuple[str, list[str]]] = []
    for block in scene.text.split("\n\n"):
        lines = [ln for ln in block.strip().splitlines() if ln.strip()]
        if not lines or lines[0].startswith("["):
            continue
        if lines[0].endswith(":") and lines[0][:-1].strip() and lines[0].upper() == lines[0]:
            out.append((lines[0][:-1], lines[1:]))
        elif out:
            out[-1][1].extend(lines)
    return [(name, lines) for name, lines in out if lines]


def _speaker_examples(scene: Scene) -> list[dict]:
    """Four consecutive speeches, the last one's speaker hidden; only where that speaker
    also speaks in the first three (so the answer is in the passage)."""
    out = []
    turns = speeches(scene)
    for i in range(3, len(turns)):
        window = turns[i - 3:i + 1]
        answer = window[-1][0]
        if answer not in {name for name, _ in window[:-1]}:
            continue
        shown = [f"{name}:\n" + "\n".join(lines[:2]) for name, lines in window[:-1]]
        shown.append("???:\n" + "\n".join(window[-1][1][:2]))
        out.append({"instruction": "Who speaks the lines marked ???? Answer with the "
                                   "speaker's name.",
                    "input": "\n\n".join(shown), "output": answer})
    return out


def _continue_examples(scene: Scene) -> list[dict]:
    return [{"instruction": "Continue this speech with its next line.",
             "input": f"{name}:\n{lines[0]}\n{lines[1]}", "output": lines[2]}
            for name, lines in speeches(scene) if len(lines) >= 3]


def _genre_examples(scene: Scene) -> list[dict]:
    passage = "\n\n".join(f"{name}:\n" + "\n".join(lines) for name, lines in
                           speeches(scene)[:4])[:240]
    if not passage:
        return []
    return [{"instruction": "Is this passage from a comedy, a history or a tragedy? Answer "
                            "with one word.",
             "input": passage, "output": GENRE_CLASS[scene.genre]}]


SFT_TASKS = {"speaker": _speaker_examples, "continue": _continue_examples,
             "genre": _genre_examples}
PER_PLAY = 30  # examples per play and task, so that long plays do not dominate


def instruction_task(name: str, seed: int = 0) -> dict[str, list[dict]]:
    """builtin:speaker | continue | genre: Alpaca records (instruction, input, output) per
    split, at most PER_PLAY per play, chosen with `seed`."""
    make = builtin_task(name, SFT_TASKS)
    out: dict[str, list[dict]] = {s: [] for s in SPLITS}
    for split, scenes in scenes_by_split(seed).items():
        by_play: dict[str, list[dict]] = defaultdict(list)
        for scene in scenes:
            by_play[scene.play] += make(scene)
        for play in sorted(by_play):
            records = by_play[play]
            random.Random(f"{seed}-{name}-{play}").shuffle(records)
            out[split] += records[:PER_PLAY]
    return out


def builtin_task(name: str, tasks: dict):
    """The task `name` of `tasks` (from "builtin:NAME"), or an error listing the known ones."""
    if name not in tasks:
        raise ScratchError(f"no built-in task {name!r}; choose from "
                           f"{', '.join('builtin:' + t for t in tasks)}")
    return tasks[name]
