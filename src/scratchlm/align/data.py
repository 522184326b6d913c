"""Preference pairs and prompts for alignment, read from files or built from the built-in
corpus, and turned into token ids with the model's prompt template.

A pair is a prompt (a conversation that ends with a user turn) and two responses, chosen and
rejected. Records may come as
- TRL's explicit form: {"prompt": str | [messages], "chosen": str | [one assistant message],
  "rejected": ...};
- TRL's implicit chat form: {"chosen": [messages], "rejected": [messages]}, two whole
  conversations that agree up to their last (assistant) message, which is the prompt;
- Alpaca: {"instruction", "input", "chosen", "rejected"} (the book's preference file).
Prompts for PPO and GRPO come from {"prompt"} or {"messages"} records, from Alpaca or
preference records (their prompts), or from a built-in task.

Built-in preference sets, from the built-in corpus split by play (scratchlm.data.tasks):
- builtin:continue: the prompt is two lines of a speech ("Continue this speech with its next
  line."); chosen is the speech's real next line, rejected the same words in a seeded random
  order (lines of fewer than four words are left out): fluent verse against word salad;
- builtin:speaker: the prompt is three speeches and a fourth whose speaker is hidden;
  chosen is the right name, rejected another speaker of the passage (seeded choice).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

import torch

from scratchlm.data.records import read_records
from scratchlm.data.tasks import SFT_TASKS, instruction_task
from scratchlm.errors import ScratchError
from scratchlm.model.logprobs import IGNORE
from scratchlm.templates import (
    Template,
    alpaca_messages,
    check_messages,
    get_template,
    load_template,
)

Messages = list[dict]
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class Pair:
    prompt: Messages
    """The conversation so far, ending with a user turn."""
    chosen: str
    rejected: str


# ------------------------------------------------------------------------------------------------
# records


def _checked(messages: list, where: str) -> Messages:
    try:
        check_messages(messages)
    except ScratchError as e:
        raise ScratchError(f"{where}: {e}") from None
    return messages


def _prompt(value, where: str) -> Messages:
    """A prompt given as text (one user turn) or as chat messages ending with a user turn."""
    if isinstance(value, str):
        if not value.strip():
            raise ScratchError(f"{where}: the prompt is empty; give each record a prompt")
        return [{"role": "user", "content": value}]
    if not isinstance(value, list):
        raise ScratchError(f"{where}: 'prompt' must be a string or a list of chat messages")
    messages = _checked(value, where)
    if messages[-1]["role"] != "user":
        raise ScratchError(f"{where}: the prompt must end with a user message, not "
                           f"{messages[-1]['role']!r}")
    return messages


def _response(value, where: str, name: str) -> str:
    """A response given as text or as one assistant message; empty ones are refused."""
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], dict) \
            and value[0].get("role") == "assistant":
        value = value[0].get("content")
    if not isinstance(value, str):
        raise ScratchError(f"{where}: {name!r} must be a string or one assistant message")
    if not value.strip():
        raise ScratchError(f"{where}: the {name} response is empty; remove the record or "
                           "give it a response")
    return value


def to_pair(record: dict, where: str) -> Pair:
    """One record in any of the forms in the module docstring."""
    if "chosen" not in record or "rejected" not in record:
        raise ScratchError(f"{where}: no 'chosen' and 'rejected'; a preference record needs "
                           "both (see the README for the formats)")
    chosen, rejected = record["chosen"], record["rejected"]
    if "instruction" in record:
        prompt = alpaca_messages(str(record["instruction"]), str(record.get("input") or ""))
    elif "prompt" in record:
        prompt = _prompt(record["prompt"], where)
    elif isinstance(chosen, list) and isinstance(rejected, list) and chosen and rejected:
        _checked(chosen, where), _checked(rejected, where)
        if chosen[:-1] != rejected[:-1]:
            raise ScratchError(f"{where}: the chosen and rejected conversations differ before "
                               "their last message; give the prompt as 'prompt'")
        prompt = _prompt(chosen[:-1], where)
        chosen, rejected = chosen[-1:], rejected[-1:]
    else:
        raise ScratchError(f"{where}: no prompt ('prompt', 'instruction', or chosen/rejected "
                           "as whole conversations); see the README for the formats")
    return Pair(prompt, _response(chosen, where, "chosen"), _response(rejected, where, "rejected"))


def to_prompt(record: dict, where: str) -> Messages:
    """The prompt of a record for PPO/GRPO: {prompt}, {messages} (a final assistant turn is
    dropped), or Alpaca / preference records."""
    if "instruction" in record:
        return alpaca_messages(str(record["instruction"]), str(record.get("input") or ""))
    if "prompt" in record:
        return _prompt(record["prompt"], where)
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            raise ScratchError(f"{where}: 'messages' must be a non-empty list of messages")
        messages = _checked(messages, where)
        if messages[-1]["role"] == "assistant":
            messages = messages[:-1]
        return _prompt(messages, where)
    raise ScratchError(f"{where}: no 'prompt', 'messages' or 'instruction' field; see the "
                       "README for the prompt formats")


def _split(items: list, fractions: list[float], seed: int) -> dict[str, list]:
    items = list(items)
    random.Random(seed).shuffle(items)
    n_train = int(len(items) * fractions[0])
    n_val = int(len(items) * fractions[1])
    return {"train": items[:n_train], "val": items[n_train:n_train + n_val],
            "test": items[n_train + n_val:]}


# ------------------------------------------------------------------------------------------------
# the built-in sets


def _shuffled_line(record: dict, rng: random.Random) -> str | None:
    words = record["output"].split()
    if len(set(words)) < 4:
        return None
    shuffled = list(words)
    while shuffled == words:
        rng.shuffle(shuffled)
    return " ".join(shuffled)


def _other_speaker(record: dict, rng: random.Random) -> str | None:
    names = [block.split(":\n", 1)[0] for block in record["input"].split("\n\n")[:-1]]
    others = sorted({n for n in names if n != record["output"]})
    return rng.choice(others) if others else None


BUILTIN_PAIRS: dict[str, Callable[[dict, random.Random], str | None]] = {
    "continue": _shuffled_line, "speaker": _other_speaker}


def builtin_pairs(name: str, seed: int) -> dict[str, list[Pair]]:
    """builtin:continue | speaker: pairs per split (split by play); see the module docstring."""
    if name not in BUILTIN_PAIRS:
        raise ScratchError(f"no built-in preference set {name!r}; choose from "
                           f"{', '.join('builtin:' + n for n in BUILTIN_PAIRS)}")
    reject = BUILTIN_PAIRS[name]
    out: dict[str, list[Pair]] = {}
    for split, records in instruction_task(name, seed).items():
        pairs = []
        for i, r in enumerate(records):
            rejected = reject(r, random.Random(f"{seed}-{name}-{split}-{i}"))
            if rejected is not None:
                pairs.append(Pair(alpaca_messages(r["instruction"], r["input"]), r["output"],
                                  rejected))
        out[split] = pairs
    return out


def builtin_prompts(name: str, seed: int) -> dict[str, list[Messages]]:
    """The prompts of a built-in instruction task (continue, speaker, genre) per split."""
    if name not in SFT_TASKS:
        raise ScratchError(f"no built-in prompt set {name!r}; choose from "
                           f"{', '.join('builtin:' + n for n in SFT_TASKS)}")
    return {split: [alpaca_messages(r["instruction"], r["input"]) for r in records]
            for split, records in instruction_task(name, seed).items()}


# ------------------------------------------------------------------------------------------------
# splits


def pair_splits(data: str, fractions: list[float], seed: int, identical: str, section: str
                ) -> tuple[dict[str, list[Pair]], int]:
    """(pairs per split, pairs dropped as identical): a built-in set, or a file shuffled with
    `seed` and split by `fractions`. A pair whose responses are the same text is an error
    unless `identical` is "drop"."""
    if not data:
        raise ScratchError("no data: pass --data FILE (preference pairs, JSON/JSONL) or "
                           f"--data {' or '.join('builtin:' + n for n in BUILTIN_PAIRS)}")
    if data.startswith("builtin:"):
        return builtin_pairs(data.removeprefix("builtin:"), seed), 0
    pairs = [to_pair(r, f"{data}: record {i + 1}") for i, r in enumerate(read_records(data))]
    same = [i for i, p in enumerate(pairs) if p.chosen.strip() == p.rejected.strip()]
    if same and identical == "error":
        raise ScratchError(f"{data}: record {same[0] + 1} has the same chosen and rejected "
                           f"response ({len(same)} such record(s)), which teaches nothing; "
                           f"remove them or pass --{section}.identical=drop")
    dropped = set(same)
    return _split([p for i, p in enumerate(pairs) if i not in dropped], fractions, seed), \
        len(same)


def prompt_splits(data: str, fractions: list[float], seed: int) -> dict[str, list[Messages]]:
    """Prompts per split: a built-in task (split by play) or a file (shuffled with `seed`)."""
    if not data:
        raise ScratchError("no prompts: pass --data FILE (JSONL prompts, or a preference or "
                           "Alpaca file) or --data builtin:continue|speaker|genre")
    if data.startswith("builtin:"):
        return builtin_prompts(data.removeprefix("builtin:"), seed)
    prompts = [to_prompt(r, f"{data}: record {i + 1}") for i, r in enumerate(read_records(data))]
    return _split(prompts, fractions, seed)


# ------------------------------------------------------------------------------------------------
# token ids


def resolve_template(name: str | None, model_dir) -> Template:
    """The template asked for, else the model's own (template.json), else alpaca."""
    if name:
        return get_template(name)
    return load_template(model_dir) or get_template("alpaca")


@dataclass
class Seq:
    ids: list[int]
    """Prompt then response tokens."""
    start: int
    """Where the response begins."""


@dataclass
class EncodedPair:
    chosen: Seq
    rejected: Seq
    ref_chosen: float = 0.0
    """The reference model's log-probability of the chosen response (DPO)."""
    ref_rejected: float = 0.0


def split_turn(template: Template, tokenizer, prompt: Messages, response: str
               ) -> tuple[list[int], list[int]]:
    """(prompt ids, response ids) of prompt + response rendered with `template`: the response
    is the last run of assistant tokens (its content and the end-of-turn token), the prompt
    everything before it."""
    ids, mask = template.encode(tokenizer, prompt + [{"role": "assistant",
                                                      "content": response}])
    end = len(mask) - mask[::-1].index(True)
    start = end
    while start > 0 and mask[start - 1]:
        start -= 1
    return ids[:start], ids[start:end]


def fit(prompt: list[int], response: list[int], max_length: int, max_prompt_length: int
        ) -> tuple[list[int], list[int], bool]:
    """Cut prompt + response to max_length tokens: first the prompt's start (down to
    max_prompt_length tokens; its end holds the question), then the response's end."""
    if len(prompt) + len(response) <= max_length:
        return prompt, response, False
    prompt = prompt[-max_prompt_length:]
    return prompt, response[:max_length - len(prompt)], True


def length_limits(max_length: int | None, max_prompt_length: int | None, block_size: int,
                  section: str) -> tuple[int, int]:
    """(max_length, max_prompt_length) resolved against the model's context."""
    length = max_length or block_size
    if length > block_size:
        raise ScratchError(f"{section}.max_length ({length}) is longer than the model's "
                           f"context ({block_size}); lower it")
    prompt = max_prompt_length or length // 2
    if prompt >= length:
        raise ScratchError(f"{section}.max_prompt_length ({prompt}) must be less than "
                           f"{section}.max_length ({length}), to leave room for a response")
    return length, prompt


def encode_pairs(pairs: list[Pair], template: Template, tokenizer, max_length: int,
                 max_prompt_length: int) -> tuple[list[EncodedPair], dict[str, int]]:
    """Token ids of each pair's two sequences, cut to max_length; how many pairs were cut,
    and how many were dropped because cutting left the two responses the same."""
    out, cut, dropped = [], 0, 0
    for pair in pairs:
        seqs, was_cut = [], False
        for response in (pair.chosen, pair.rejected):
            p, r = split_turn(template, tokenizer, pair.prompt, response)
            p, r, cut_here = fit(p, r, max_length, max_prompt_length)
            was_cut |= cut_here
            seqs.append(Seq(p + r, len(p)))
        cut += was_cut
        if seqs[0].ids[seqs[0].start:] == seqs[1].ids[seqs[1].start:]:
            dropped += 1
            continue
        out.append(EncodedPair(*seqs))
    return out, {"cut": cut, "dropped": dropped}


def collate_sequences(seqs: list[Seq], pad_id: int) -> dict[str, torch.Tensor]:
    """Inputs (N, T) right-padded with pad_id and targets (N, T): the next token where it is
    a response token, IGNORE elsewhere; T = the longest sequence less one."""
    T = max(len(s.ids) for s in seqs) - 1
    idx = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    targets = torch.full((len(seqs), T), IGNORE, dtype=torch.long)
    for i, s in enumerate(seqs):
        n = len(s.ids)
        idx[i, :n - 1] = torch.tensor(s.ids[:-1])
        # target t is token t + 1: response tokens start..n-1 sit at start-1..n-2
        targets[i, s.start - 1:n - 1] = torch.tensor(s.ids[s.start:])
    return {"idx": idx, "targets": targets}


def collate_pairs(pairs: list[EncodedPair], pad_id: int) -> dict[str, torch.Tensor]:
    """One batch of 2B rows, the B chosen sequences then the B rejected ones (one forward
    pass for both), with the reference log-probs (B,) of each side."""
    batch = collate_sequences([p.chosen for p in pairs] + [p.rejected for p in pairs], pad_id)
    batch["ref_chosen"] = torch.tensor([p.ref_chosen for p in pairs], dtype=torch.float32)
    batch["ref_rejected"] = torch.tensor([p.ref_rejected for p in pairs], dtype=torch.float32)
    return batch
