"""Alignment data: preference pairs in TRL's, chat and Alpaca forms, prompts, seeded splits
whose held-out pairs are never trained on, the built-in sets, token ids and collation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from scratchlm.align.data import (
    Pair,
    Seq,
    builtin_pairs,
    collate_pairs,
    encode_pairs,
    fit,
    pair_splits,
    prompt_splits,
    split_turn,
    to_pair,
    to_prompt,
)
from scratchlm.errors import ScratchError
from scratchlm.model.logprobs import IGNORE
from scratchlm.templates import alpaca_messages, get_template
from scratchlm.tokenizer import BPETokenizer

USER = [{"role": "user", "content": "Name a play."}]
WANT = Pair(USER, "Hamlet.", "A banana.")

FORMS = [
    {"prompt": "Name a play.", "chosen": "Hamlet.", "rejected": "A banana."},
    {"prompt": USER, "chosen": [{"role": "assistant", "content": "Hamlet."}],
     "rejected": [{"role": "assistant", "content": "A banana."}]},
    {"chosen": USER + [{"role": "assistant", "content": "Hamlet."}],
     "rejected": USER + [{"role": "assistant", "content": "A banana."}]},
]


def write_pairs(path: Path, n: int) -> Path:
    """The first n builtin:continue training pairs as a TRL-form JSONL file: runs on it take
    seconds (the whole built-in set is a thousand pairs)."""
    pairs = builtin_pairs("continue", 123)["train"][:n]
    path.write_text("".join(json.dumps({"prompt": p.prompt, "chosen": p.chosen,
                                        "rejected": p.rejected}) + "\n" for p in pairs))
    return path


def preference_file(shared_data: Path) -> Path:
    return shared_data / "instruct" / "instruction-data-with-preference.json"


@pytest.mark.parametrize("record", FORMS, ids=["trl", "trl-chat", "implicit-chat"])
def test_trl_and_chat_forms(record: dict) -> None:
    assert to_pair(record, "x") == WANT


def test_alpaca_form_is_the_books_prompt(shared_data: Path) -> None:
    record = next(r for r in json.loads(preference_file(shared_data).read_text())
                  if r["input"])
    pair = to_pair(record, "x")
    assert pair.prompt == alpaca_messages(record["instruction"], record["input"])
    assert (pair.chosen, pair.rejected) == (record["chosen"], record["rejected"])


BAD = [
    ({"prompt": "p", "chosen": "a"}, "no 'chosen' and 'rejected'"),
    ({"prompt": "p", "chosen": "  ", "rejected": "b"}, "the chosen response is empty"),
    ({"prompt": "p", "chosen": "a", "rejected": ""}, "the rejected response is empty"),
    ({"prompt": "", "chosen": "a", "rejected": "b"}, "the prompt is empty"),
    ({"chosen": USER + [{"role": "assistant", "content": "a"}],
      "rejected": [{"role": "user", "content": "other"}, {"role": "assistant", "content": "b"}]},
     "differ before their last message"),
    ({"prompt": [{"role": "assistant", "content": "hi"}], "chosen": "a", "rejected": "b"},
     "must end with a user message"),
    ({"chosen": "a", "rejected": "b"}, "no prompt"),
]


@pytest.mark.parametrize("record, message", BAD)
def test_bad_records_are_named(record: dict, message: str) -> None:
    with pytest.raises(ScratchError, match=message) as e:
        to_pair(record, "data.jsonl: record 3")
    assert str(e.value).startswith("data.jsonl: record 3: ")


def test_shared_preference_file_splits_by_seed_and_its_identical_pairs(
        shared_data: Path) -> None:
    path = str(preference_file(shared_data))
    with pytest.raises(ScratchError, match=r"record \d+ has the same chosen and rejected "
                       r"response \(6 such record\(s\)\).*--dpo.identical=drop"):
        pair_splits(path, [0.85, 0.05, 0.10], 123, "error", "dpo")
    splits, dropped = pair_splits(path, [0.85, 0.05, 0.10], 123, "drop", "dpo")
    assert dropped == 6
    assert [len(splits[s]) for s in ("train", "val", "test")] == [929, 54, 111]
    key = {s: {(p.prompt[0]["content"], p.chosen) for p in v} for s, v in splits.items()}
    assert not key["train"] & key["test"] and not key["train"] & key["val"]
    again, _ = pair_splits(path, [0.85, 0.05, 0.10], 123, "drop", "dpo")
    assert again == splits
    other, _ = pair_splits(path, [0.85, 0.05, 0.10], 7, "drop", "dpo")
    assert other["test"] != splits["test"]


def test_jsonl_of_every_form(tmp_path: Path) -> None:
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in FORMS * 10))
    splits, _ = pair_splits(str(path), [0.8, 0.1, 0.1], 0, "error", "reward")
    assert sum(len(v) for v in splits.values()) == 30
    assert all(p == WANT for v in splits.values() for p in v)


def test_builtin_preference_sets() -> None:
    cont = builtin_pairs("continue", 123)
    assert len(cont["train"]) > 500 and cont["test"]
    for p in cont["train"][:50]:
        assert p.chosen != p.rejected and sorted(p.chosen.split()) == sorted(p.rejected.split())
    speaker = builtin_pairs("speaker", 123)
    for p in speaker["train"][:50]:
        passage = p.prompt[0]["content"]
        assert p.chosen != p.rejected and f"{p.rejected}:\n" in passage
    prompts = {s: {p.prompt[0]["content"] for p in v} for s, v in speaker.items()}
    assert not prompts["train"] & prompts["test"]  # split by play
    with pytest.raises(ScratchError, match="choose from builtin:continue, builtin:speaker"):
        pair_splits("builtin:genre", [0.8, 0.1, 0.1], 0, "error", "dpo")


def test_prompts_of_every_form(tmp_path: Path) -> None:
    path = tmp_path / "prompts.jsonl"
    rows = [{"prompt": "Name a play."}, {"messages": USER},
            {"messages": USER + [{"role": "assistant", "content": "Hamlet."}]},
            {"instruction": "Name a play.", "input": ""}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows * 5))
    splits = prompt_splits(str(path), [0.6, 0.2, 0.2], 0)
    assert sum(len(v) for v in splits.values()) == 20
    assert all(p[-1]["role"] == "user" for v in splits.values() for p in v)
    assert to_prompt(rows[3], "x") == alpaca_messages("Name a play.")
    genre = prompt_splits("builtin:genre", [0.8, 0.1, 0.1], 123)
    assert genre["test"] and genre["test"][0][0]["content"].startswith("Is this passage")
    with pytest.raises(ScratchError, match="no 'prompt', 'messages' or 'instruction'"):
        to_prompt({"text": "x"}, "x")


@pytest.fixture(scope="module")
def tok(tiny_run: Path) -> BPETokenizer:
    return BPETokenizer.load(tiny_run / "final")


def test_token_ids_prompt_response_and_collation(tok: BPETokenizer) -> None:
    template = get_template("alpaca")
    prompt = alpaca_messages("Continue the line.", "To be, or not to be")
    p, r = split_turn(template, tok, prompt, "that is the question")
    assert p == template.encode(tok, prompt, add_generation_prompt=True)[0]
    assert tok.decode(r) == "that is the question<|endoftext|>"
    pairs = [Pair(prompt, "that is the question", "question the is that"),
             Pair(alpaca_messages("Say hi."), "hi", "go away, you")]
    encoded, stats = encode_pairs(pairs, template, tok, 128, 64)
    assert stats == {"cut": 0, "dropped": 0}
    batch = collate_pairs(encoded, tok.eot_id)
    assert batch["idx"].shape[0] == 4  # chosen, chosen, rejected, rejected
    for row, seq in enumerate([encoded[0].chosen, encoded[1].chosen, encoded[0].rejected,
                               encoded[1].rejected]):
        targets = [t for t in batch["targets"][row].tolist() if t != IGNORE]
        assert targets == seq.ids[seq.start:]
        n = len(seq.ids) - 1
        assert batch["idx"][row, :n].tolist() == seq.ids[:-1]
        assert torch.all(batch["idx"][row, n:] == tok.eot_id)


def test_long_sequences_lose_the_prompts_start_then_the_responses_end() -> None:
    prompt, response = list(range(10)), list(range(100, 106))
    assert fit(prompt, response, 20, 8) == (prompt, response, False)
    p, r, cut = fit(prompt, response, 12, 8)
    assert cut and p == prompt[-8:] and r == response[:4]
    # A pair whose responses become the same once cut is dropped, and counted.
    template = get_template("alpaca")
    tok = BPETokenizer.train("ab cd ef " * 50, 300, "gpt4", progress=False)
    pairs = [Pair([{"role": "user", "content": "ab"}], "cd cd cd ef", "cd cd cd ab")]
    p0, _ = split_turn(template, tok, pairs[0].prompt, "cd")
    encoded, stats = encode_pairs(pairs, template, tok, len(p0) + 1, len(p0))
    assert encoded == [] and stats == {"cut": 1, "dropped": 1}
    assert Seq([1, 2, 3], 1).ids == [1, 2, 3]
