"""`scratchlm demo`: every stage that has landed, on the built-in Shakespeare corpus.

tokenizer -> data shards -> pretraining -> samples -> evaluation on the built-in tasks ->
classification and instruction fine-tuning (RUN/genre, RUN/sft) -> alignment: SFT, reward
model, PPO and DPO (RUN/align) -> report.md, in one run directory. What is already built
there with the same config is reused, so a second run only redoes what changed. The
fine-tuning stages follow their recipes (configs/demo-genre.yaml, demo-sft.yaml), alignment
scratchlm.align.demo; the command line's --train.* overrides apply to every stage, so
`--train.max_steps=4` makes the whole demo a smoke test.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable
from pathlib import Path

from scratchlm.config import (
    ClassifyConfig,
    Config,
    SFTConfig,
    load_config,
    resolve_recipe,
    save_config,
    to_dict,
)
from scratchlm.data.loader import read_manifest
from scratchlm.data.prepare import summary_table
from scratchlm.errors import ScratchError
from scratchlm.generate import generate_text
from scratchlm.model.checkpoint import load_model
from scratchlm.tokenizer import BPETokenizer
from scratchlm.train.pretrain import (
    check_data,
    check_tokenizer,
    ensure_data,
    ensure_tokenizer,
    run_pretraining,
)
from scratchlm.utils import atomic_write_text, data_dir

PROMPTS = ["ROMEO:\n", "HAMLET:\nTo be, or not", "KING HENRY V:\nOnce more"]


def _shape(cfg: Config) -> dict:
    """What decides a trained model: the training settings and the model shape (its
    vocabulary follows from the tokenizer)."""
    return {"train": to_dict(cfg.train),
            "model": {k: v for k, v in to_dict(cfg.model).items() if k != "vocab_size"}}


def finished_summary(cfg: Config, out: Path) -> dict | None:
    """The summary of a finished run of the same config in `out`; an error for another
    config's."""
    summary, saved = out / "summary.json", out / "final" / "run.yaml"
    if not (summary.is_file() and saved.is_file()):
        return None
    if _shape(load_config(Config, saved)) != _shape(cfg):
        raise ScratchError(f"{out} holds a finished run of another config; use another --out "
                           "or delete it")
    return json.loads(summary.read_text())


def trained_model(cfg: Config, out: Path, prepared: tuple[Path, Path], progress: bool,
                  finished: dict | None) -> tuple[dict, bool]:
    """Pretrain, continue an interrupted run, or reuse a finished run of the same config."""
    if finished is not None:
        print(f"[train] reusing the finished run in {out}")
        return finished, True
    resume = (out / "checkpoints").is_dir() and any((out / "checkpoints").iterdir())
    return run_pretraining(cfg, out, resume, progress, prepared), False


def evaluation_report(out: Path, reused: bool, progress: bool) -> list[str]:
    """The built-in tasks (held-out scenes; 100 examples each) against chance; the table of
    an earlier run is kept when the model is the same."""
    from scratchlm.eval.evaluate import evaluate_demo_model

    table = out / "eval.md"
    if not (reused and table.is_file()):
        print(f"[demo] evaluating on the built-in tasks -> {out / 'eval.json'}")
        table = evaluate_demo_model(out / "final", out / "eval.json", limit=100,
                                    progress=progress)
    return ["## Evaluation", "",
            "The built-in tasks, drawn from the scenes pretraining held out (zero-shot; "
            "`scratchlm evaluate --tasks builtin`):", "", table.read_text(encoding="utf-8"), ""]


def demo_stage(run: Callable, cls: type, overrides: list[str], out: Path, progress: bool,
               recipe: Path | None = None) -> dict:
    """A stage's summary (its config: the recipe, then the overrides): reused when `out` holds
    a finished run of this config, resumed when it holds an interrupted one, else run from
    the start; a run of another config there is refused."""
    from scratchlm.train.trainer import run_finished

    cfg = load_config(cls, recipe, overrides)
    saved = out / "config.yaml"
    if saved.is_file() and load_config(cls, saved) != cfg:
        raise ScratchError(f"{out} holds a run of another config; use another --out or "
                           "delete it")
    done = run_finished(out)
    if done is not None:
        print(f"[demo] reusing the finished run in {out}")
        return done
    resume = (out / "checkpoints").is_dir() and any((out / "checkpoints").iterdir())
    return run(cfg, out, resume=resume, progress=progress)


def finetune_stages(out: Path, train_overrides: list[str], progress: bool) -> dict[str, dict]:
    """Classification (builtin:genre) and SFT (builtin:speaker) on the pretrained model, each
    a run of its own under `out` (recipes configs/demo-genre.yaml and demo-sft.yaml)."""
    from scratchlm.finetune.classify import run_classify
    from scratchlm.finetune.sft import run_sft

    stages = {"genre": (ClassifyConfig, "classify", run_classify),
              "sft": (SFTConfig, "sft", run_sft)}
    results = {}
    for name, (cls, section, run) in stages.items():
        print(f"[demo] fine-tuning: {name} -> {out / name}")
        overrides = [f"--{section}.model={out / 'final'}", *train_overrides]
        results[name] = demo_stage(run, cls, overrides, out / name, progress,
                                   resolve_recipe(f"demo-{name}"))
    return results


def finetune_report(results: dict[str, dict], out: Path) -> list[str]:
    genre, sft = results["genre"], results["sft"]
    test = genre["metrics"]["test"]
    rows = [json.loads(line) for line in (out / "sft" / "responses.jsonl").read_text(
        encoding="utf-8").splitlines()]
    lines = ["## Fine-tuning", "",
             "Classification (`genre/`, configs/demo-genre.yaml): comedy, history or tragedy of "
             "a scene, tested on plays never trained on.", "",
             f"- test accuracy **{test['accuracy']:.1%}**, macro-F1 {test['macro_f1']:.3f} "
             f"(majority class: {genre['majority']:.1%})", "", "![confusion](genre/confusion.png)",
             "", "Instruction tuning (`sft/`, configs/demo-sft.yaml): \"who speaks this line?\" "
             "with the Alpaca template, answered greedily on held-out plays.", "",
             f"- exact match **{sft['test']['exact_match']:.1%}**, token F1 "
             f"{sft['test']['token_f1']:.3f} on {len(rows)} questions", "",
             "| line | reference | answer |", "|---|---|---|"]
    for row in rows[:3]:
        line = row["prompt"].splitlines()[-1][:60].replace("|", "/")
        lines.append(f"| {line} | {row['reference']} | {row['response'].strip()[:30]} |")
    return lines + [""]


def alignment_report(out: Path, train_overrides: list[str], progress: bool) -> list[str]:
    """SFT -> reward model -> PPO and SFT -> DPO in out/align (scratchlm.align.demo); its
    table here, the full report (samples, curves) beside it."""
    from scratchlm.align.demo import run_alignment_demo

    print(f"[demo] alignment -> {out / 'align'}")
    report = run_alignment_demo(out / "align", out / "final", progress, train_overrides)
    lines = report.read_text(encoding="utf-8").splitlines()
    first = next(k for k, line in enumerate(lines) if line.startswith("|"))
    table = list(itertools.takewhile(lambda x: x.startswith("|"), lines[first:]))
    return ["## Alignment", "", "From the pretrained model: SFT on `builtin:continue`, a reward "
            "model on its pairs and PPO against it; DPO from the same SFT model "
            "([align/report.md](align/report.md): samples before and after, curves).", "",
            *table, ""]


def run_demo(cfg: Config, out: Path, progress: bool = True,
             train_overrides: list[str] = ()) -> Path:
    # Check everything already in `out` first, write after: a refused run changes nothing.
    check_tokenizer(cfg, out)
    check_data(cfg, out)
    finished = finished_summary(cfg, out)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    tok_dir = ensure_tokenizer(cfg, out, progress)
    shards = ensure_data(cfg, out, tok_dir, progress)
    summary, reused = trained_model(cfg, out, (tok_dir, shards), progress, finished)
    tok = BPETokenizer.load(tok_dir)
    model = load_model(out / "final")
    samples = [generate_text(model, tok, p, 120, temperature=0.8, top_k=50, seed=k)
               for k, p in enumerate(PROMPTS)]
    held_out = None
    shakespeare = data_dir() / "corpus" / "tinyshakespeare.txt"
    if shakespeare.is_file():  # a second, independent text (it overlaps the plays' text)
        from scratchlm.eval.perplexity import evaluate_text

        held_out = evaluate_text(model, tok, shakespeare.read_text(encoding="utf-8")[-100_000:])
    manifest = read_manifest(shards)
    val = summary["val"]
    lines = [
        "# scratchlm demo report",
        "",
        "The whole pipeline on the built-in corpus (Shakespeare's plays, one document per "
        "scene)." + (" Reused from an earlier run." if reused else ""),
        "",
        "## Tokenizer",
        "",
        f"- {tok!r}, pattern `{cfg.tokenizer.pattern}`, trained on data.inputs",
        "",
        "## Data",
        "",
        "```",
        summary_table(manifest),
        "```",
        "",
        "## Pretraining",
        "",
        f"- model: {summary['parameters'] / 1e6:.2f}M parameters, {cfg.model.n_layer} layers x "
        f"{cfg.model.n_embd}, context {cfg.model.block_size}",
        f"- {summary['steps']} steps, {summary['tokens']:,} tokens in {summary['seconds']:.0f} s "
        f"on {summary['device']} ({summary['precision']}): {summary['tokens_per_s']:,.0f} "
        f"tokens/s, MFU {summary['mfu']:.1%} of a measured {summary['peak_flops'] / 1e9:.0f} "
        "GFLOP/s matmul peak",
        f"- validation: loss {val['loss']:.3f} nats/token, perplexity {val['ppl']:.1f}, "
        f"**{val['bpb']:.3f} bits per byte**",
    ]
    if held_out:
        lines.append(f"- last 100 kB of Tiny Shakespeare (../shared/data): "
                     f"{held_out['bpb']:.3f} bits per byte")
    lines += ["", "![loss curve](loss.png)", "", "## Samples", ""]
    for prompt, text in zip(PROMPTS, samples):
        lines += ["```", prompt + text, "```", ""]
    lines += evaluation_report(out, reused, progress)
    lines += finetune_report(finetune_stages(out, list(train_overrides), progress), out)
    lines += alignment_report(out, list(train_overrides), progress)
    report = atomic_write_text(out / "report.md", "\n".join(lines))
    print(f"[demo] validation bits/byte {val['bpb']:.3f}; sample:\n{PROMPTS[0]}{samples[0]}")
    return report
