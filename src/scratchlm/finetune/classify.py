"""Classification fine-tuning: a pretrained model and a linear head read at the last real
token (or the mean of the real tokens) of each text, trained with cross-entropy over labels.

`scratchlm finetune classify` -> RUN/
  final/              the model, classifier.safetensors (the head), classifier.json (labels,
                      pooling, padding id, length), the tokenizer
  metrics.json        loss, accuracy, macro-F1, per-class precision/recall and the confusion
                      matrix on train, val and test
  confusion.png, curves.png, loss.png, metrics.jsonl/.csv, summary.json, checkpoints/

Which parts train is a choice (`classify.trainable`): the head alone; the last blocks, the
final norm and the head (the book's recipe, chapter 6); or everything. Padding is on the right
(the head reads position length - 1); texts longer than `max_length` tokens are cut at the end,
and how many were is counted and reported.
"""

from __future__ import annotations

import json
import math
import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from scratchlm.config import ClassifyConfig, ClassifySection
from scratchlm.data.records import read_records
from scratchlm.data.tasks import BUILTIN_CLASSIFY, builtin_task
from scratchlm.errors import ScratchError
from scratchlm.model.gpt import GPT, set_dropout, tied_weights
from scratchlm.model.logprobs import IGNORE, sequence_logprobs
from scratchlm.model.lora import apply_lora, lora_layers
from scratchlm.parallel import init_distributed, is_main, print0
from scratchlm.train.objective import ExampleObjective
from scratchlm.utils import atomic_write_text

HEAD = "classifier"  # the extra module's name: classifier.safetensors beside the model
EVAL_BATCH = 16


@dataclass
class Example:
    ids: list[int]
    label: int


# ------------------------------------------------------------------------------------------------
# data


def read_labelled(section: ClassifySection, path: str) -> list[tuple[str, str]]:
    """(text, label) pairs of a file, labels as strings; empty texts are an error."""
    text, label = section.text_field, section.label_field
    rows = read_records(path, [text, label], section.columns, headerless=[label, text])
    pairs = []
    for i, row in enumerate(rows, 1):
        value = row[text]
        if not isinstance(value, str) or not value.strip():
            raise ScratchError(f"{path}: record {i} has an empty {text!r}; remove it or fix "
                               "the text field")
        if row[label] is None or str(row[label]).strip() == "":
            raise ScratchError(f"{path}: record {i} has an empty {label!r}")
        pairs.append((value, str(row[label]).strip()))
    return pairs


def labelled_splits(section: ClassifySection) -> dict[str, list[tuple[str, str]]]:
    """(text, label) pairs per split, from one file split by fractions, from three files, or
    from a built-in task."""
    if section.data and (section.train_file or section.val_file or section.test_file):
        raise ScratchError("give classify.data (one file to split) or train/val/test files, "
                           "not both")
    if section.data and section.data.startswith("builtin:"):
        return builtin_task(section.data.removeprefix("builtin:"),
                            BUILTIN_CLASSIFY)(section.seed)
    if section.data:
        pairs = read_labelled(section, section.data)
        counts = Counter(label for _, label in pairs)
        rare = [label for label, n in counts.items() if n < 2]
        if rare:
            raise ScratchError(f"{section.data}: label {rare[0]!r} has only one example; every "
                               "class needs examples to train on and to test on")
        rng = random.Random(section.seed)
        if section.balance == "undersample":  # every class as large as the smallest
            smallest = min(counts.values())
            by_label: dict[str, list] = {}
            for pair in pairs:
                by_label.setdefault(pair[1], []).append(pair)
            pairs = [p for label in sorted(by_label)
                     for p in rng.sample(by_label[label], smallest)]
        rng.shuffle(pairs)
        n_train = int(len(pairs) * section.split[0])
        n_val = int(len(pairs) * section.split[1])
        return {"train": pairs[:n_train], "val": pairs[n_train:n_train + n_val],
                "test": pairs[n_train + n_val:]}
    if not (section.train_file and section.val_file):
        raise ScratchError("no data: give --data FILE (split by classify.split), "
                           "--data builtin:genre, or --train FILE --val FILE [--test FILE]")
    splits = {"train": read_labelled(section, section.train_file),
              "val": read_labelled(section, section.val_file)}
    if section.test_file:
        splits["test"] = read_labelled(section, section.test_file)
    known = {label for _, label in splits["train"]}
    for name in ("val", "test"):
        unseen = sorted({label for _, label in splits.get(name, [])} - known)
        if unseen:
            raise ScratchError(f"the {name} file has label {unseen[0]!r}, which the training "
                               "file never has; the labels of every split must be the "
                               "training labels")
    return splits


def encode_splits(splits: dict[str, list[tuple[str, str]]], tokenizer, max_length: int,
                  labels: list[str]) -> tuple[dict[str, list[Example]], dict[str, int]]:
    """Token ids (cut to max_length) and label ids per split; and how many were cut."""
    index = {label: i for i, label in enumerate(labels)}
    out, cut = {}, {}
    for name, pairs in splits.items():
        ids = tokenizer.encode_batch([t for t, _ in pairs], disallowed_special=())
        cut[name] = sum(len(x) > max_length for x in ids)
        out[name] = [Example(x[:max_length], index[label]) for x, (_, label) in zip(ids, pairs)]
    return out, cut


def majority_accuracy(data: dict[str, list[Example]]) -> float:
    """The baseline to beat: the accuracy on the test split (else validation) of always
    answering the training split's most common label."""
    common = Counter(e.label for e in data["train"]).most_common(1)[0][0]
    shown = data.get("test") or data["val"]
    return sum(e.label == common for e in shown) / len(shown)


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded ids (B, T), lengths (B,), labels (B,)."""
    T = max(len(e.ids) for e in examples)
    idx = torch.full((len(examples), T), pad_id, dtype=torch.long)
    for i, e in enumerate(examples):
        idx[i, :len(e.ids)] = torch.tensor(e.ids)
    return {"idx": idx, "lengths": torch.tensor([len(e.ids) for e in examples]),
            "labels": torch.tensor([e.label for e in examples])}


# ------------------------------------------------------------------------------------------------
# the head


def pool(hidden: torch.Tensor, lengths: torch.Tensor, pooling: str) -> torch.Tensor:
    """hidden (B, T, C) -> (B, C): the last real position's state, or the mean or the
    channel-wise max over real positions (padding is on the right)."""
    if pooling == "last":
        return hidden[torch.arange(hidden.size(0), device=hidden.device), lengths - 1]
    real = (torch.arange(hidden.size(1), device=hidden.device)[None] < lengths[:, None])
    if pooling == "max":
        return hidden.masked_fill(~real[..., None], float("-inf")).amax(1)
    return (hidden * real[..., None]).sum(1) / lengths[:, None].to(hidden.dtype)


def class_logits(model: GPT, head: nn.Module, batch: dict, pooling: str) -> torch.Tensor:
    """(B, n_labels) logits of a collated batch."""
    _, hidden = model(batch["idx"], logits=False)  # (B, T, C) after the final norm
    return head(pool(hidden, batch["lengths"], pooling)).float()


def lm_loss_per_example(logits: torch.Tensor, idx: torch.Tensor, lengths: torch.Tensor
                        ) -> torch.Tensor:
    """(B,) each example's mean next-token loss over its own tokens (padding excluded):
    logits (B, T, vocab) of ids idx (B, T) right-padded to lengths (B,)."""
    targets = idx[:, 1:].masked_fill(
        torch.arange(1, idx.size(1), device=idx.device)[None] >= lengths[:, None], IGNORE)
    return -sequence_logprobs(logits[:, :-1], targets, "mean")


def new_head(model: GPT, n_labels: int) -> nn.Linear:
    # No bias, as Hugging Face's ...ForSequenceClassification `score` layer, so it exports
    # exactly; initialised like the model's own linear layers.
    head = nn.Linear(model.config.n_embd, n_labels, bias=False)
    nn.init.normal_(head.weight, std=model.config.init_std)
    return head


def probed_head(model_dir: Path, model: GPT, labels: list[str], pooling: str
                ) -> nn.Linear | None:
    """The head of the classifier in `model_dir` when it reads the same labels the same way,
    else None (a new head). Fine-tuning a probe's run this way is LP-FT (Kumar et al. 2022):
    the body starts from a head that already fits it, so the first steps' gradients do not
    come from a random head."""
    meta = classifier_meta(model_dir)
    if not meta:
        return None
    mine = {"kind": "classifier", "labels": labels, "pooling": pooling}
    theirs = {"kind": meta.get("kind", "classifier"), "labels": meta.get("labels"),
              "pooling": meta.get("pooling")}
    if theirs != mine:
        print0(f"[classify] {model_dir} is a classifier of {theirs}, not {mine}: a new head")
        return None
    print0(f"[classify] starting from the head of {model_dir} (same labels and pooling)")
    return load_head(model_dir, model, len(labels))


def classifier_meta(model_dir: Path) -> dict:
    """final/classifier.json of a classifier or reward model ({} for any other model)."""
    path = model_dir / "classifier.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def load_head(model_dir: Path, model: GPT, n_labels: int) -> nn.Linear:
    """The trained head saved beside the model in `model_dir`."""
    from scratchlm.model.checkpoint import load_extras

    head = new_head(model, n_labels)
    state = load_extras(model_dir, [HEAD])  # {"classifier.weight": ...}
    head.load_state_dict({k.split(".", 1)[1]: v for k, v in state.items()})
    return head


def set_trainable(model: GPT, trainable: str, last_blocks: int) -> None:
    """Freeze what does not train. The language-model head is never used by classification:
    an untied one is always frozen (a tied one is the embedding)."""
    for p in model.parameters():
        p.requires_grad_(trainable == "all")
    if trainable == "last":
        if last_blocks > len(model.blocks):
            raise ScratchError(f"classify.last_blocks ({last_blocks}) is more than the model's "
                               f"{len(model.blocks)} blocks")
        for name in list(model.blocks)[-last_blocks:]:
            model.blocks[name].requires_grad_(True)
        model.norm_f.requires_grad_(True)
    if not tied_weights(model):
        model.lm_head.requires_grad_(False)


# ------------------------------------------------------------------------------------------------
# metrics


def confusion_matrix(predicted: list[int], gold: list[int], n: int) -> list[list[int]]:
    """counts[gold][predicted]."""
    m = [[0] * n for _ in range(n)]
    for p, g in zip(predicted, gold):
        m[g][p] += 1
    return m


def classification_metrics(confusion: list[list[int]], labels: list[str]) -> dict:
    """Accuracy, macro-F1 and per-class precision / recall / F1 from a confusion matrix (a
    class never predicted has precision 0, sklearn's convention with zero_division=0)."""
    n = len(labels)
    total = sum(map(sum, confusion))
    correct = sum(confusion[i][i] for i in range(n))
    per_class, f1s = {}, []
    for i, label in enumerate(labels):
        predicted = sum(confusion[g][i] for g in range(n))
        actual = sum(confusion[i])
        precision = confusion[i][i] / predicted if predicted else 0.0
        recall = confusion[i][i] / actual if actual else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[label] = {"precision": precision, "recall": recall, "f1": f1,
                            "support": actual}
        f1s.append(f1)
    return {"accuracy": correct / total if total else math.nan,
            "macro_f1": sum(f1s) / n, "per_class": per_class, "confusion": confusion,
            "examples": total}


# ------------------------------------------------------------------------------------------------
# the objective


class ClassifyObjective(ExampleObjective):
    name = "classification"

    def __init__(self, model: GPT, data: dict[str, list[Example]], labels: list[str],
                 section: ClassifySection, pad_id: int, max_length: int,
                 truncated: dict[str, int], head: nn.Linear | None = None) -> None:
        super().__init__(data)
        self.labels, self.truncated = labels, truncated
        self.pad_id, self.max_length = pad_id, max_length
        self.pooling, self.lm_weight = section.pooling, section.lm_weight
        self.extras = {HEAD: head or new_head(model, len(labels))}
        if not lora_layers(model):  # with LoRA the adapters train, the base stays frozen
            set_trainable(model, section.trainable, section.last_blocks)

    def collate(self, examples: list[Example]) -> dict[str, torch.Tensor]:
        return collate(examples, self.pad_id)

    def count(self, batch: dict) -> int:
        return len(batch["labels"])

    def loss(self, model: GPT, extras: nn.ModuleDict, batch: dict
             ) -> tuple[torch.Tensor, torch.Tensor]:
        lm_logits, hidden = model(batch["idx"], logits=bool(self.lm_weight))  # (B, T, C)
        logits = extras[HEAD](pool(hidden, batch["lengths"], self.pooling)).float()
        loss = F.cross_entropy(logits, batch["labels"], reduction="sum")
        if self.lm_weight:  # GPT-1's auxiliary objective, from the same forward pass
            lm = lm_loss_per_example(lm_logits, batch["idx"], batch["lengths"]).sum()
            loss = loss + self.lm_weight * lm
        return loss, batch["labels"].numel()

    def _logits_fn(self, model: GPT, extras: nn.ModuleDict, batch: dict) -> torch.Tensor:
        return class_logits(model, extras[HEAD], batch, self.pooling)

    @torch.no_grad()
    def predict(self, runtime, examples: list[Example]) -> tuple[torch.Tensor, float]:
        """(predicted label ids, summed loss) over examples, through the laid-out module."""
        preds, loss = [], 0.0
        for i in range(0, len(examples), EVAL_BATCH):
            batch = {k: v.to(runtime.device) for k, v in
                     collate(examples[i:i + EVAL_BATCH], self.pad_id).items()}
            with runtime.autocast():
                logits = runtime.call(self._logits_fn, batch)
            loss += F.cross_entropy(logits, batch["labels"], reduction="sum").item()
            preds.append(logits.argmax(-1).cpu())
        return torch.cat(preds), loss

    def split_metrics(self, runtime, split: str) -> dict:
        examples = self.data[split]
        preds, loss = self.predict(runtime, examples)
        confusion = confusion_matrix(preds.tolist(), [e.label for e in examples],
                                     len(self.labels))
        return {"loss": loss / len(examples), **classification_metrics(confusion, self.labels)}

    def evaluate(self, runtime) -> dict[str, float]:
        m = self.split_metrics(runtime, "val")
        return {"loss": m["loss"], "accuracy": m["accuracy"], "macro_f1": m["macro_f1"]}

    def finish(self, runtime, out: Path, summary: dict) -> None:
        runtime.module.eval()
        metrics = {split: self.split_metrics(runtime, split) for split in self.data
                   if self.data[split]}
        summary["metrics"] = {s: {k: m[k] for k in ("loss", "accuracy", "macro_f1")}
                              for s, m in metrics.items()}
        summary["majority"] = majority_accuracy(self.data)
        summary["truncated"] = self.truncated
        if not is_main():
            return
        meta = {"labels": self.labels, "pooling": self.pooling, "pad_id": self.pad_id,
                "max_length": self.max_length}
        atomic_write_text(out / "final" / "classifier.json", json.dumps(meta, indent=2))
        atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2))
        shown = "test" if "test" in metrics else "val"
        plot_confusion(metrics[shown]["confusion"], self.labels, out / "confusion.png",
                       f"{shown} confusion matrix (accuracy {metrics[shown]['accuracy']:.1%})")
        from scratchlm.train.metrics import plot_curves

        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        plot_curves(rows, out / "curves.png", "classification fine-tuning",
                    [("loss", ["loss", "val_loss"]), ("validation", ["val_accuracy",
                                                                     "val_macro_f1"])])


def plot_confusion(confusion: list[list[int]], labels: list[str], path: Path,
                   title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(labels)
    fig, ax = plt.subplots(figsize=(1.2 * n + 2.5, 1.2 * n + 2), dpi=120)
    ax.imshow(confusion, cmap="Blues")
    ax.set_xticks(range(n), labels, rotation=45, ha="right")
    ax.set_yticks(range(n), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    top = max(max(row) for row in confusion) or 1
    for g in range(n):
        for p in range(n):
            ax.text(p, g, str(confusion[g][p]), ha="center", va="center",
                    color="white" if confusion[g][p] > top / 2 else "black")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------
# the stage


def run_classify(cfg: ClassifyConfig, out: Path, resume: bool = False,
                 progress: bool = True) -> dict:
    """Fine-tune cfg.classify.model on the task into the run directory `out`."""
    from scratchlm.model.load import load_pretrained
    from scratchlm.train.trainer import Trainer, resolve_device, start_run

    section = cfg.classify
    if not section.model:
        raise ScratchError("no model to fine-tune: pass --model DIR (a run, a model directory "
                           "or a Hugging Face directory)")
    if (done := start_run(out, resume, None if cfg.train.epochs else cfg.train.max_steps)) \
            is not None:
        return done
    splits = labelled_splits(section)
    labels = sorted({label for _, label in splits["train"]})
    if len(labels) < 2:
        raise ScratchError(f"the training data has a single label ({labels[0]!r}); "
                           "classification needs at least two")
    for name in ("train", "val"):
        if not splits.get(name):
            raise ScratchError(f"the {name} split is empty; give more examples or change "
                               "classify.split")
    model, tokenizer, source = load_pretrained(section.model, tokenizer=section.tokenizer)
    if section.dropout is not None:  # before LoRA, whose adapters keep lora.dropout
        set_dropout(model, section.dropout)
    dist = init_distributed(resolve_device(cfg.train.device), cfg.parallel, model.config)
    max_length = min(section.max_length or model.config.block_size, model.config.block_size)
    data, cut = encode_splits(splits, tokenizer, max_length, labels)
    pad_id = tokenizer.eot_id if tokenizer.eot_id is not None else 0
    print0(f"[classify] {source}: {model.num_params() / 1e6:.2f}M parameters; labels "
           f"{labels}; examples " + ", ".join(f"{k} {len(v):,}" for k, v in data.items())
           + "; cut to " + f"{max_length} tokens: "
           + ", ".join(f"{k} {n:,}" for k, n in cut.items()))
    torch.manual_seed(cfg.train.seed)  # the head's (and LoRA's) initialisation
    if cfg.lora.rank:
        apply_lora(model, cfg.lora)
    head = probed_head(Path(source), model, labels, section.pooling)
    objective = ClassifyObjective(model, data, labels, section, pad_id, max_length, cut, head)
    trainer = Trainer(cfg.train, cfg.parallel, model, objective, out, cfg, tokenizer, resume,
                      progress, dist)
    trainable = trainer.trainable_parameters
    what = f"LoRA rank {cfg.lora.rank} + head" if cfg.lora.rank else section.trainable
    print0(f"[classify] training {trainable:,} parameters ({what}), "
           f"{trainer.max_steps} steps of {trainer.global_batch} examples")
    return trainer.run()


# ------------------------------------------------------------------------------------------------
# using a trained classifier


class Classifier:
    """A fine-tuned classifier loaded from its model directory (or run directory)."""

    def __init__(self, path: str | Path, device: str = "cpu") -> None:
        from scratchlm.model.load import load_pretrained

        self.model, self.tokenizer, d = load_pretrained(path, device)
        meta = classifier_meta(d)
        if not meta:
            raise ScratchError(f"{d} is not a classifier (no classifier.json); fine-tune one "
                               "with `scratchlm finetune classify`")
        self.directory, self.kind = d, meta.get("kind", "classifier")
        self.labels, self.pooling = meta["labels"], meta["pooling"]
        self.pad_id, self.max_length = meta["pad_id"], meta["max_length"]
        self.head = load_head(d, self.model, len(self.labels)).to(device)
        self.device = device

    @torch.no_grad()
    def probabilities(self, texts: list[str]) -> torch.Tensor:
        """(len(texts), n_labels) class probabilities."""
        if self.kind == "reward":  # the same head's layout, but one score and no classes
            raise ScratchError(f"{self.directory} is a reward model, not a classifier: its "
                               "one output is a score, not class probabilities; load it with "
                               "scratchlm.align.reward.RewardModel")
        if any(not t.strip() for t in texts):
            raise ScratchError("a text to classify is empty")
        ids = self.tokenizer.encode_batch(texts, disallowed_special=())
        examples = [Example(x[:self.max_length], 0) for x in ids]
        probs = []
        for i in range(0, len(examples), EVAL_BATCH):
            batch = {k: v.to(self.device) for k, v in
                     collate(examples[i:i + EVAL_BATCH], self.pad_id).items()}
            probs.append(class_logits(self.model, self.head, batch, self.pooling).softmax(-1))
        return torch.cat(probs).cpu()

    def hf_spec(self) -> dict:
        """What scratchlm.model.hf needs to export it as a ...ForSequenceClassification."""
        return {"weight": self.head.weight, "labels": self.labels, "pad_id": self.pad_id,
                "pooling": self.pooling}

    def predict(self, texts: list[str]) -> list[tuple[str, float]]:
        """(label, its probability) per text."""
        probs = self.probabilities(texts)
        return [(self.labels[int(p.argmax())], float(p.max())) for p in probs]
