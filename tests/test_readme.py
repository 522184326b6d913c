"""The README is a contract: every ```bash block runs as written, top to bottom, in one fresh
directory, so a later block can use what an earlier one made (tok/, runs/tiny, ...).

Budgets are the one substitution: `scratchlm` and `torchrun` are wrapper scripts here and
`make` a shell function; they append BUDGET to the verbs that train (and fewer test answers to
`finetune sft`), so `pretrain --config tiny-cpu` stops after a few steps instead of 60 (`make
demo` is `scratchlm demo` with that budget; `make test` is not run again). A block that cannot
run on a test machine (a cluster, many machines) is preceded in the README by
`<!-- not run: REASON -->`."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SKIP = re.compile(r"<!-- not run: (.+?) -->\s*$")
# Small budgets for the verbs that train. Later overrides win, so these cap what the README
# asks for (the README's own --train.max_steps=40 becomes 4 here).
BUDGET = ("--train.max_steps=4 --train.epochs=0 --train.eval_every=2 --train.checkpoint_every=2 "
          "--train.eval_batches=2")
# `scratchlm` and `torchrun` are wrapper scripts first on PATH that add the budget and `exec`
# the real command, so `scratchlm serve ... & server=$!` is the server's own process id.
WRAPPERS = {
    "scratchlm": """case "$1 ${2:-}" in
  "finetune sft") exec REAL "$@" BUDGET --sft.eval_examples=4 ;;
  pretrain*|finetune*|align*|demo*) exec REAL "$@" BUDGET ;;
  *) exec REAL "$@" ;;
esac""",
    "torchrun": 'exec REAL "$@" BUDGET',
}
PRELUDE = """set -euo pipefail
make() {
  case "$1" in
    demo) scratchlm demo ;;
    test|test-slow|test-all) echo "make $1: this suite itself, not run again" ;;
    *) command make "$@" ;;
  esac
}
"""


def blocks(text: str) -> list[tuple[int, str, str | None]]:
    """(line number, body, skip reason or None) of every ```bash block."""
    lines, found, k = text.splitlines(), [], 0
    while k < len(lines):
        if lines[k].strip() == "```bash":
            start, body = k + 1, []
            k += 1
            while lines[k].strip() != "```":
                body.append(lines[k])
                k += 1
            before = lines[start - 2] if start >= 2 else ""
            match = SKIP.search(before)
            found.append((start, "\n".join(body), match.group(1) if match else None))
        k += 1
    return found


def test_blocks_are_found_and_every_skip_says_why() -> None:
    found = blocks((ROOT / "README.md").read_text(encoding="utf-8"))
    assert len(found) >= 10
    assert sum(reason is None for _, _, reason in found) >= 6  # most blocks run
    for line, _, reason in found:
        assert reason is None or len(reason) > 10, f"README line {line}: say why it is skipped"


@pytest.mark.slow
def test_readme_commands_run_as_written(tmp_path: Path, shared_data: Path) -> None:
    # The layout of a clone: configs/ beside the commands, ../shared/data beside the clone.
    work = tmp_path / "scratchlm"
    work.mkdir()
    (work / "configs").symlink_to(ROOT / "configs")
    (work / ".venv").symlink_to(Path(sys.executable).parents[1])  # for `source .venv/...`
    (tmp_path / "shared").symlink_to(shared_data.parent)
    wrappers = tmp_path / "bin"
    wrappers.mkdir()
    for name, body in WRAPPERS.items():
        real = Path(sys.executable).parent / name
        script = wrappers / name
        script.write_text("#!/bin/bash\n" + body.replace("REAL", str(real))
                          .replace("BUDGET", BUDGET) + "\n")
        script.chmod(0o755)
    path = os.pathsep.join([str(wrappers), str(Path(sys.executable).parent), os.environ["PATH"]])
    env = {**os.environ, "PATH": path, "SCRATCHLM_DATA": str(tmp_path / "shared" / "data")}
    for line, body, reason in blocks((ROOT / "README.md").read_text(encoding="utf-8")):
        if reason is not None:
            continue
        done = subprocess.run(["bash", "-c", PRELUDE + body], cwd=work, env=env,
                              capture_output=True, text=True, timeout=1500)
        assert done.returncode == 0, (f"README block at line {line} failed:\n{body}\n"
                                      f"{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
