"""A real IsoFLOP sweep on the built-in corpus, the scaling-law fits, and the held-out check:
the law fitted without the largest budget predicts that budget's best validation loss.

  python bench/bench_scaling.py            (or `make bench`)

The same as
  scratchlm scaling sweep --out runs/scaling-cpu --budgets 1e10,2e10,4e10,8e10 \\
      --sizes 1x4,1x8,1x16,1x24,1x32 --sweep.head_dim=8 --sweep.min_steps=50 \\
      --sweep.tokens_per_param=[3,1000] --train.micro_batch=16 --train.global_batch_tokens=2048
  scratchlm scaling fit --sweep runs/scaling-cpu
but single-threaded: these models are so small that a step is mostly framework overhead, and
on a shared 2-core machine a second thread spends its time waiting for the first. Finished
runs are skipped when the script runs again; the plots are copied to docs/scaling/ for the
README.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import torch
from results import save

from scratchlm.config import load_config, resolve_recipe
from scratchlm.scaling.laws import EPOCH, HOFFMANN
from scratchlm.scaling.report import write_fit
from scratchlm.scaling.sweep import ScalingConfig, run_sweep

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "runs" / "scaling-cpu"
BUDGETS = "1e10,2e10,4e10,8e10"
SIZES = "1x4,1x8,1x16,1x24,1x32"


def run() -> None:
    cfg = load_config(ScalingConfig, resolve_recipe("scaling-cpu"),
                      [f"--sweep.budgets=[{BUDGETS}]", f"--sweep.sizes=[{SIZES}]",
                       "--sweep.head_dim=8", "--sweep.min_steps=50",
                       "--sweep.tokens_per_param=[3,1000]",
                       "--train.micro_batch=16", "--train.global_batch_tokens=2048"])
    start = time.perf_counter()
    records = run_sweep(cfg, OUT, progress=False)
    seconds = time.perf_counter() - start
    fit = write_fit(OUT)
    docs = ROOT / "docs" / "scaling"
    docs.mkdir(parents=True, exist_ok=True)
    for plot in fit["plots"]:
        shutil.copy(plot, docs / Path(plot).name)

    trained = sum(r["seconds"] or 0.0 for r in records)
    steps = sum(r["steps"] for r in records)
    print(f"\n{len(records)} runs, {steps:,} steps, budgets {BUDGETS} FLOPs (the model's own "
          f"count), sizes {SIZES}: {trained:.0f} s of training in all, {seconds:.0f} s this "
          "time (finished runs are skipped)\n")
    law = fit["law"]
    print("| constant | this sweep | Hoffmann et al. 2022 | Besiroglu et al. 2024 |")
    print("|---|---:|---:|---:|")
    for key in ("E", "A", "B", "alpha", "beta", "a", "b"):
        print(f"| {key} | {law[key]:.4g} | {HOFFMANN.as_dict()[key]:.4g} "
              f"| {EPOCH.as_dict()[key]:.4g} |")
    print("\n| budget (FLOPs) | runs | N_opt | D_opt | D/N | loss at the vertex |")
    print("|---:|---:|---:|---:|---:|---:|")
    for p in fit["isoflop"]:
        if p["n_opt"] is None:
            print(f"| {p['budget']:.3g} | {p['runs']} | no vertex | | | |")
        else:
            print(f"| {p['budget']:.3g} | {p['runs']} | {p['n_opt']:,.0f} | {p['d_opt']:,.0f} "
                  f"| {p['d_opt'] / p['n_opt']:.1f} | {p['loss_opt']:.4f} |")
    if fit["exponents"]:
        e = fit["exponents"]
        print(f"\nIsoFLOP exponents: N_opt ∝ C^{e['a']:.3f}, D_opt ∝ C^{e['b']:.3f}; "
              f"parametric a = {law['a']:.3f}, b = {law['b']:.3f}")
    else:
        print(f"\nIsoFLOP exponents: not measured (fewer than 3 budgets with a vertex among "
              f"the sizes); parametric N_opt ∝ C^{law['a']:.3f}, D_opt ∝ C^{law['b']:.3f}")
    h = fit["held_out"]
    print(f"\nheld out {h['budget']:.3g} FLOPs (fitted on "
          f"{', '.join(f'{b:.3g}' for b in h['fit_budgets'])}): predicted best loss "
          f"{h['predicted_best']:.4f}, observed {h['observed_best']:.4f}, error "
          f"{100 * h['relative_error']:+.2f}% "
          f"({'within' if abs(h['relative_error']) < 0.03 else 'NOT within'} 3%)")
    save("scaling", {"budgets": BUDGETS, "sizes": SIZES, "runs": records, "fit": fit,
                     "seconds": seconds, "training_seconds": trained})


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
