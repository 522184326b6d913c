"""Instruction fine-tuning (SFT): next-token loss on conversations rendered with a prompt
template, by default on the response tokens only (the prompt is context, not a target).

`scratchlm finetune sft --model DIR --data FILE|builtin:TASK --template alpaca|chat --out DIR`
-> RUN/
  final/            the model (grown by the template's special tokens, if any), its tokenizer,
                    template.json (so generate, chat and serve prompt it the same way)
  responses.jsonl   greedy answers to the test split's prompts, with their references and
                    scores; metrics.json (validation loss; test exact match, token F1,
                    ROUGE-L); loss.png, metrics.jsonl/.csv, summary.json, checkpoints/

Data: Alpaca JSON/JSONL (instruction, input, output), chat JSONL ({"messages": [...]},
multi-turn), or a built-in task of the built-in corpus (split by play). Examples are padded to
the longest in their micro-batch, capped at max_length (longer ones cut, dropped or refused, as
configured, and counted); `packing` fills each sequence with several examples instead.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from scratchlm.config import SFTConfig, SFTSection
from scratchlm.data.records import read_records
from scratchlm.data.tasks import instruction_task
from scratchlm.errors import ScratchError
from scratchlm.eval.metrics import answer_scores, exact_match, rouge_l, token_f1
from scratchlm.model.gpt import GPT
from scratchlm.model.logprobs import IGNORE, cross_entropy_sum
from scratchlm.parallel import init_distributed, is_main, print0
from scratchlm.templates import Template, alpaca_messages, check_messages, save_template
from scratchlm.train.objective import ExampleObjective
from scratchlm.utils import atomic_write_text

EVAL_BATCH = 8
Conversation = list[dict]


@dataclass
class Example:
    ids: list[int]
    labels: list[int]  # ids where the loss counts, IGNORE elsewhere (same length)


# ------------------------------------------------------------------------------------------------
# data


def to_conversation(record: dict, where: str) -> Conversation:
    """An Alpaca record (instruction, input, output) or a chat record (messages) as a list
    of messages."""
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            raise ScratchError(f"{where}: 'messages' is empty; a conversation needs at least "
                               "a user and an assistant message")
        try:
            check_messages(messages)
        except ScratchError as e:
            raise ScratchError(f"{where}: {e}") from None
        return messages
    if "instruction" not in record:
        raise ScratchError(f"{where}: neither 'messages' (chat) nor 'instruction' (Alpaca); "
                           "see the README for the formats")
    if "output" not in record:
        raise ScratchError(f"{where}: Alpaca record without 'output'; every example needs "
                           "the response to learn")
    return alpaca_messages(str(record["instruction"]), str(record.get("input") or ""),
                           str(record["output"]))


def read_conversations(path: str) -> list[Conversation]:
    rows = read_records(path)
    convs = [to_conversation(r, f"{path}: record {i + 1}") for i, r in enumerate(rows)]
    for i, conv in enumerate(convs):
        if conv[-1]["role"] != "assistant":
            raise ScratchError(f"{path}: record {i + 1} does not end with an assistant "
                               "message, so there is no response to learn")
    return convs


def conversation_splits(section: SFTSection) -> dict[str, list[Conversation]]:
    """Conversations per split: a built-in task (split by play), a file split by fractions
    (seeded), or a file and a separate validation file."""
    if section.data.startswith("builtin:"):
        records = instruction_task(section.data.removeprefix("builtin:"), section.seed)
        return {split: [to_conversation(r, section.data) for r in rows]
                for split, rows in records.items()}
    if not section.data:
        raise ScratchError("no data: pass --data FILE (Alpaca or chat JSON/JSONL) or "
                           "--data builtin:speaker|continue|genre")
    convs = read_conversations(section.data)
    random.Random(section.seed).shuffle(convs)
    if section.val_data:
        n_test = int(len(convs) * section.split[2] / (section.split[0] + section.split[2]))
        return {"train": convs[n_test:], "val": read_conversations(section.val_data),
                "test": convs[:n_test]}
    n_train = int(len(convs) * section.split[0])
    n_val = int(len(convs) * section.split[1])
    return {"train": convs[:n_train], "val": convs[n_train:n_train + n_val],
            "test": convs[n_train + n_val:]}


def encode_examples(convs: list[Conversation], template: Template, tokenizer, max_length: int,
                    too_long: str, train_on_prompt: bool) -> tuple[list[Example], dict]:
    """Token ids and labels per conversation, at most max_length + 1 tokens each (inputs and
    targets are that shifted by one); how many were cut or dropped."""
    examples, cut, dropped = [], 0, 0
    for i, conv in enumerate(convs):
        ids, mask = template.encode(tokenizer, conv)
        if len(ids) > max_length + 1:
            if too_long == "error":
                raise ScratchError(f"example {i + 1} is {len(ids):,} tokens, longer than "
                                   f"max_length {max_length} + 1; raise sft.max_length (up to "
                                   "the model's context) or set sft.too_long=cut or drop")
            if too_long == "drop":
                dropped += 1
                continue
            ids, mask = ids[:max_length + 1], mask[:max_length + 1]
            cut += 1
        labels = [t if (m or train_on_prompt) else IGNORE for t, m in zip(ids, mask)]
        if all(label == IGNORE for label in labels[1:]):
            dropped += 1  # the response was cut away entirely: nothing to learn
            continue
        examples.append(Example(ids, labels))
    return examples, {"cut": cut, "dropped": dropped}


def pack(examples: list[Example], max_length: int) -> list[Example]:
    """Examples concatenated, in order, into sequences of at most max_length + 1 tokens (an
    example that does not fit starts a new one)."""
    packed: list[Example] = []
    ids: list[int] = []
    labels: list[int] = []
    for e in examples:
        if ids and len(ids) + len(e.ids) > max_length + 1:
            packed.append(Example(ids, labels))
            ids, labels = [], []
        ids, labels = ids + e.ids, labels + e.labels
    if ids:
        packed.append(Example(ids, labels))
    return packed


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Inputs (B, T) padded with pad_id, targets (B, T) the next labels padded with IGNORE,
    T = the longest example's length - 1."""
    T = max(len(e.ids) for e in examples) - 1
    idx = torch.full((len(examples), T), pad_id, dtype=torch.long)
    targets = torch.full((len(examples), T), IGNORE, dtype=torch.long)
    for i, e in enumerate(examples):
        idx[i, :len(e.ids) - 1] = torch.tensor(e.ids[:-1])
        targets[i, :len(e.labels) - 1] = torch.tensor(e.labels[1:])
    return {"idx": idx, "targets": targets}


# ------------------------------------------------------------------------------------------------
# answering


@torch.no_grad()
def respond(model: GPT, tokenizer, template: Template, conversations: list[Conversation],
            max_new_tokens: int) -> list[str]:
    """Greedy replies to conversations that end with a user message (prompted with the
    template's generation prompt, stopped at its end-of-turn token)."""
    from scratchlm.generate import stream

    was_training = model.training
    model.eval()
    stops = template.stop_ids(tokenizer)
    device = next(model.parameters()).device
    replies = []
    for conv in conversations:
        ids, _ = template.encode(tokenizer, conv, add_generation_prompt=True)
        ids = ids[-(model.config.block_size - 1):]  # keep the end: it holds the question
        budget = min(max_new_tokens, model.config.block_size - len(ids))
        out = []
        for token in stream(model, torch.tensor([ids], device=device), budget,
                            temperature=0.0, stop_tokens=stops):
            if int(token[0]) in stops:
                break
            out.append(int(token[0]))
        replies.append(tokenizer.decode(out).strip())
    model.train(was_training)
    return replies


def score_responses(model: GPT, tokenizer, template: Template, convs: list[Conversation],
                    max_new_tokens: int, shots: list[Conversation] = ()) -> list[dict]:
    """Answer each conversation's last user turn (after `shots`, earlier conversations put in
    front as examples) and score the answer against the conversation's own reply."""
    prompts = [[m for shot in shots for m in shot] + conv[:-1] for conv in convs]
    replies = respond(model, tokenizer, template, prompts, max_new_tokens)
    rows = []
    for conv, reply in zip(convs, replies):
        reference = conv[-1]["content"]
        rows.append({"prompt": conv[-2]["content"], "reference": reference, "response": reply,
                     "exact_match": exact_match(reply, reference),
                     "token_f1": token_f1(reply, reference),
                     "rouge_l": rouge_l(reply, reference)})
    return rows


# ------------------------------------------------------------------------------------------------
# the objective


class SFTObjective(ExampleObjective):
    name = "instruction tuning"
    token_level = True

    def __init__(self, data: dict[str, list[Example]], test: list[Conversation],
                 tokenizer, template: Template, section: SFTSection, pad_id: int,
                 stats: dict) -> None:
        super().__init__(data)
        self.test, self.tokenizer, self.template = test, tokenizer, template
        self.section, self.pad_id, self.stats = section, pad_id, stats

    def collate(self, examples: list[Example]) -> dict[str, torch.Tensor]:
        return collate(examples, self.pad_id)

    def token_loss(self, logits: torch.Tensor, targets: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        return cross_entropy_sum(logits, targets)

    def evaluate(self, runtime) -> dict[str, float]:
        """Mean loss per response token on the validation split (all of it, or on the last
        pipeline stage's share summed over stages)."""
        val = self.data["val"]
        if not val:
            return {}
        nats, count = torch.zeros((), dtype=torch.float64), 0
        for i in range(0, len(val), EVAL_BATCH):
            batch = collate(val[i:i + EVAL_BATCH], self.pad_id)
            with runtime.autocast():
                logits = runtime.logits(batch["idx"].to(runtime.device))
            count += int((batch["targets"] != IGNORE).sum())
            if logits is not None:
                nats += cross_entropy_sum(logits, batch["targets"].to(runtime.device))[0].cpu()
        if runtime.stage_group is not None:
            torch.distributed.all_reduce(nats, group=runtime.stage_group)
        loss = nats.item() / max(count, 1)
        return {"loss": loss, "ppl": float(torch.tensor(loss).exp())}

    def finish(self, runtime, out: Path, summary: dict) -> None:
        summary["examples"] = {k: len(v) for k, v in self.data.items()}
        summary["length"] = self.stats
        rows = []
        if runtime.whole and self.test:
            test = self.test[:self.section.eval_examples or None]
            rows = runtime.call(lambda model, _: score_responses(
                model, self.tokenizer, self.template, test, self.section.max_new_tokens))
            summary["test"] = answer_scores([r["response"] for r in rows],
                                            [r["reference"] for r in rows])
        if not is_main():
            return
        save_template(self.template, out / "final")
        atomic_write_text(out / "responses.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
        atomic_write_text(out / "metrics.json", json.dumps(
            {"val": summary.get("val", {}), "test": summary.get("test", {})}, indent=2))


# ------------------------------------------------------------------------------------------------
# the stage


def prepare_model(section: SFTSection, template: Template, lora) -> tuple[GPT, object, Path]:
    """The base model and tokenizer, grown by the template's special tokens, LoRA attached
    when asked for."""
    from scratchlm.model.gpt import set_dropout
    from scratchlm.model.load import load_pretrained
    from scratchlm.model.lora import apply_lora, train_token_rows
    from scratchlm.model.resize import add_special_tokens

    model, tokenizer, source = load_pretrained(section.model, tokenizer=section.tokenizer)
    model, tokenizer, added = add_special_tokens(model, tokenizer, list(template.special_tokens))
    if added:
        print0(f"[sft] added {', '.join(added)} to the tokenizer and the embedding")
    if section.dropout is not None:  # before LoRA, whose adapters keep lora.dropout
        set_dropout(model, section.dropout)
    if lora.rank:
        apply_lora(model, lora)
        if added:  # new tokens have no trained rows to keep: theirs train, the old stay frozen
            train_token_rows(model, [tokenizer.special_tokens[t] for t in added])
    return model, tokenizer, source


def run_sft(cfg: SFTConfig, out: Path, resume: bool = False, progress: bool = True) -> dict:
    """Fine-tune cfg.sft.model on instruction data into the run directory `out`."""
    from scratchlm.templates import get_template
    from scratchlm.train.trainer import Trainer, resolve_device, start_run

    section = cfg.sft
    if not section.model:
        raise ScratchError("no model to fine-tune: pass --model DIR (a run, a model directory "
                           "or a Hugging Face directory)")
    if (done := start_run(out, resume, None if cfg.train.epochs else cfg.train.max_steps)) \
            is not None:
        return done
    template = get_template(section.template)
    convs = conversation_splits(section)
    if cfg.lora.rank and (cfg.parallel.tp > 1 or cfg.parallel.pp > 1):
        raise ScratchError("LoRA trains under data parallelism (DDP, ZeRO); use --parallel.dp")
    torch.manual_seed(cfg.train.seed)  # LoRA's A matrices
    model, tokenizer, source = prepare_model(section, template, cfg.lora)
    dist = init_distributed(resolve_device(cfg.train.device), cfg.parallel, model.config)
    block = model.config.block_size
    if section.max_length and section.max_length > block:
        raise ScratchError(f"sft.max_length ({section.max_length}) is longer than the model's "
                           f"context ({block}); lower it")
    max_length = section.max_length or block
    data, stats = {}, {}
    for split in ("train", "val"):
        data[split], stats[split] = encode_examples(convs[split], template, tokenizer,
                                                    max_length, section.too_long,
                                                    section.train_on_prompt)
    if not data["train"]:
        raise ScratchError("no training example is left (all were dropped as too long); "
                           "raise sft.max_length or set sft.too_long=cut")
    if section.packing:
        data["train"] = pack(data["train"], max_length)
    pad_id = tokenizer.eot_id if tokenizer.eot_id is not None else 0
    print0(f"[sft] {source}: {section.template} template; examples "
           + ", ".join(f"{k} {len(v):,}" for k, v in convs.items())
           + f"; over {max_length} tokens: " + ", ".join(
               f"{k} {s['cut']} cut, {s['dropped']} dropped" for k, s in stats.items()))
    objective = SFTObjective(data, convs["test"], tokenizer, template, section, pad_id, stats)
    trainer = Trainer(cfg.train, cfg.parallel, model, objective, out, cfg, tokenizer, resume,
                      progress, dist)
    trainable = trainer.trainable_parameters
    print0(f"[sft] training {trainable:,} of {model.num_params():,} parameters, "
           f"{trainer.max_steps} steps of {trainer.global_batch} examples")
    return trainer.run()
