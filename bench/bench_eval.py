"""Evaluation of the demo model: the built-in tasks against chance, and lm-evaluation-harness
as the referee on the same tasks, (a) its `hf` model on our Hugging Face export and (b) our
`scratchlm` model class, with the time each takes next to ours.

  python bench/bench_eval.py            (or `make bench`; needs runs/demo from `make demo`)

The built-in tasks are scored on their first BUILTIN_LIMIT examples (of 400; heldout is every
held-out token); the three-way comparison uses the first LIMIT examples of each, zero-shot and
two-shot. One thread, as in bench_scaling.py: on a shared 2-core machine a second thread
mostly waits.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import torch
from results import save

from scratchlm.eval.evaluate import evaluate_tasks, results_table
from scratchlm.eval.harness import export_lm_eval_tasks
from scratchlm.eval.tasks import resolve_tasks
from scratchlm.model.hf import save_hf
from scratchlm.model.load import load_pretrained

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "runs" / "demo"
BUILTIN_LIMIT = 200  # of 400: a standard error of about 0.03 on an accuracy near 0.3
LIMIT = 25
TASKS = ["builtin:speaker", "builtin:next_line", "builtin:cloze"]
METRICS = {"multiple_choice": ("acc", "acc_norm"), "generation": ("exact_match",)}


def lm_eval_scores(model: str, model_args: str, names: list[str], tasks_dir: Path,
                   shots: int) -> tuple[dict, float]:
    import lm_eval
    from lm_eval.tasks import TaskManager

    start = time.perf_counter()
    # Only our exported tasks: indexing lm-eval's own ~27,000 task files would dominate.
    out = lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=names,
                                  num_fewshot=shots, limit=LIMIT, device="cpu", batch_size=16,
                                  task_manager=TaskManager(include_path=str(tasks_dir),
                                                           include_defaults=False))
    return out["results"], time.perf_counter() - start


def run() -> None:
    if not (DEMO / "final").is_dir():
        print(f"{DEMO}: no demo model; run `make demo` first")
        return
    os.environ.update(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")
    model, tok, _ = load_pretrained(DEMO)
    start = time.perf_counter()
    whole = evaluate_tasks(model, tok, "builtin", limit=BUILTIN_LIMIT)
    print(f"demo model ({whole['model']['parameters'] / 1e6:.1f}M parameters) on the built-in "
          f"tasks, zero-shot, the first {BUILTIN_LIMIT} examples of each, "
          f"{time.perf_counter() - start:.0f} s:\n")
    print(results_table(whole))

    tasks = resolve_tasks(TASKS)
    rows, timing = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        hf_dir, tasks_dir = Path(tmp) / "hf", Path(tmp) / "tasks"
        save_hf(model, hf_dir, tok)
        names = [p.stem for p in export_lm_eval_tasks(tasks, tasks_dir)]
        for shots in (0, 2):
            t0 = time.perf_counter()
            ours = evaluate_tasks(model, tok, tasks, shots=shots, limit=LIMIT)
            timing[("ours", shots)] = time.perf_counter() - t0
            a, timing[("hf", shots)] = lm_eval_scores(
                "hf", f"pretrained={hf_dir},dtype=float32", names, tasks_dir, shots)
            b, timing[("scratchlm", shots)] = lm_eval_scores(
                "scratchlm", f"path={DEMO}", names, tasks_dir, shots)
            for task, name in zip(tasks, names):
                for metric in METRICS[task.kind]:
                    key = f"{metric},{'extract' if task.kind == 'generation' else 'none'}"
                    rows.append((task.name, shots, metric, ours["tasks"][task.name]["metrics"]
                                 [metric], a[name][key], b[name][key]))
    print(f"\nthe first {LIMIT} examples of each task: scratchlm evaluate, (a) lm_eval --model "
          "hf on the Hugging Face export, (b) lm_eval --model scratchlm:\n")
    print("| task | shots | metric | scratchlm evaluate | (a) lm-eval hf | (b) lm-eval scratchlm |")
    print("|---|---:|---|---:|---:|---:|")
    for task, shots, metric, ours_v, a_v, b_v in rows:
        print(f"| {task} | {shots} | {metric} | {ours_v:.3f} | {a_v:.3f} | {b_v:.3f} |")
    print("\n| shots | scratchlm evaluate | (a) lm-eval hf | (b) lm-eval scratchlm |")
    print("|---:|---:|---:|---:|")
    for shots in (0, 2):
        print(f"| {shots} | {timing[('ours', shots)]:.1f} s | {timing[('hf', shots)]:.1f} s "
              f"({timing[('hf', shots)] / timing[('ours', shots)]:.1f}x) "
              f"| {timing[('scratchlm', shots)]:.1f} s "
              f"({timing[('scratchlm', shots)] / timing[('ours', shots)]:.1f}x) |")
    save("eval", {"builtin": whole, "agreement": rows,
                  "seconds": {f"{k[0]}-{k[1]}": v for k, v in timing.items()}})


def main() -> None:
    # One thread for this benchmark only: run_all.py runs the next one in this process.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run()
    finally:
        torch.set_num_threads(threads)


if __name__ == "__main__":
    main()
