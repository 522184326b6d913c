"""Where PPO's and GRPO's rewards come from: a reward model trained by `align reward`, a
Python function of one's own (`module:function` or `path/to/file.py:function`, called as
fn(prompt, response) -> float, prompt being the last user message), or a built-in rule.

Built-in rules, for tests and demos on the built-in corpus:
- builtin:thou: the archaic second person, the share of the response's words that are thou,
  thee, thy, thine or thyself (0 to 1; common enough in the plays that a sampled response
  sometimes has one, so the policy has something to reinforce);
- builtin:verse: a line of pentameter, 1 - |syllables - 10| / 10 (at least 0) for a one-line
  response, 0 for an empty one or one of several lines; syllables counted as groups of
  vowels per word, a final silent e not counted.

Every reward is checked: a function that raises, or returns something that is not a finite
number, stops the run with one line naming the function and the response.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import re
from collections.abc import Callable
from pathlib import Path

from scratchlm.errors import ScratchError

Messages = list[dict]
WORD = re.compile(r"[a-z']+")
ARCHAIC = {"thou", "thee", "thy", "thine", "thyself"}


def thou(prompt: str, response: str) -> float:
    words = WORD.findall(response.lower())
    return sum(w in ARCHAIC for w in words) / len(words) if words else 0.0


def syllables(word: str) -> int:
    groups = re.findall(r"[aeiouy]+", word)
    n = len(groups)
    if n > 1 and word.endswith("e") and not word.endswith(("le", "ee")):
        n -= 1  # a final silent e: "love", "time"
    return max(n, 1)


def verse(prompt: str, response: str) -> float:
    lines = [line for line in response.strip().splitlines() if line.strip()]
    if len(lines) != 1:
        return 0.0
    count = sum(syllables(w) for w in WORD.findall(lines[0].lower()))
    return max(0.0, 1 - abs(count - 10) / 10)


BUILTIN_REWARDS: dict[str, Callable[[str, str], float]] = {"thou": thou, "verse": verse}


def load_function(spec: str) -> Callable:
    """`module:function`, `path/to/file.py:function`, or `builtin:NAME`."""
    if spec.startswith("builtin:"):
        name = spec.removeprefix("builtin:")
        if name not in BUILTIN_REWARDS:
            raise ScratchError(f"no built-in reward {name!r}; choose from "
                               f"{', '.join('builtin:' + n for n in BUILTIN_REWARDS)}")
        return BUILTIN_REWARDS[name]
    where, _, attr = spec.rpartition(":")
    if not where or not attr:
        raise ScratchError(f"reward {spec!r} must look like module:function, "
                           "path/to/file.py:function or builtin:NAME")
    try:
        if where.endswith(".py"):
            path = Path(where)
            if not path.is_file():
                raise ScratchError(f"reward {spec!r}: no file {path}")
            loaded = importlib.util.spec_from_file_location(path.stem, path)
            module = importlib.util.module_from_spec(loaded)
            loaded.loader.exec_module(module)
        else:
            module = importlib.import_module(where)
    except ScratchError:
        raise
    except Exception as e:  # the user's module: any error importing it is theirs to fix
        raise ScratchError(f"reward {spec!r}: importing {where} failed ({type(e).__name__}: "
                           f"{e}); fix the module or the path") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ScratchError(f"reward {spec!r}: {where} has no function {attr!r}")
    return fn


def check_score(value, source: str, index: int, response: str) -> float:
    try:
        score = float(value)
    except (TypeError, ValueError):
        score = math.nan
    if not math.isfinite(score):
        raise ScratchError(f"reward {source} returned {value!r} for response {index + 1} "
                           f"({response[:60]!r}); a reward must be a finite number")
    return score


class RewardSource:
    """Scores (prompt, response) pairs: `source(prompts, responses) -> list[float]`."""

    def __init__(self, reward_model: str | None, function: str | None, device: str,
                 section: str) -> None:
        if bool(reward_model) == bool(function):
            raise ScratchError(f"give exactly one reward: --reward-model DIR (a model trained "
                               f"by `align reward`) or --reward module:function "
                               f"(--{section}.reward_model / --{section}.reward)")
        self.model = self.fn = None
        if reward_model:
            from scratchlm.align.reward import RewardModel

            self.model = RewardModel(reward_model, device)
            self.name = f"model {reward_model}"
        else:
            self.fn = load_function(function)
            self.name = function

    def __call__(self, prompts: list[Messages], responses: list[str]) -> list[float]:
        if self.model is not None:
            values = self.model.score(prompts, responses).tolist()
            return [check_score(v, self.name, i, r)
                    for i, (v, r) in enumerate(zip(values, responses))]
        out = []
        for i, (prompt, response) in enumerate(zip(prompts, responses)):
            try:
                value = self.fn(prompt[-1]["content"], response)
            except Exception as e:  # the user's function: report it, do not crash inside
                raise ScratchError(f"reward {self.name} raised {type(e).__name__}: {e} on "
                                   f"response {i + 1} ({response[:60]!r}); fix the function"
                                   ) from None
            out.append(check_score(value, self.name, i, response))
        return out
