"""`scratchlm scaling fit` and `plan`: the laws fitted to a sweep's runs, a held-out check,
plots and a Markdown report.

The held-out check fits the parametric law to every budget but the largest and predicts the
largest budget's best loss: the lowest of the predicted losses of its runs (at their N and D)
against the lowest observed one. The fit never sees those runs, so this is a forecast, the use
a scaling law is for.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path

from scratchlm.errors import ScratchError
from scratchlm.scaling.laws import (
    EPOCH,
    HOFFMANN,
    PUBLISHED,
    ChinchillaLaw,
    bootstrap_chinchilla,
    fit_chinchilla,
    fit_power_law,
    isoflop_profile,
)

FIT = "fit.json"
MIN_VERTICES = 3  # IsoFLOP vertices the exponents of N_opt and D_opt are fitted through


def _by_budget(records: list[dict]) -> dict[float, list[dict]]:
    groups: dict[float, list[dict]] = defaultdict(list)
    for r in records:
        groups[r["budget"]].append(r)
    return dict(sorted(groups.items()))


def _law(records: list[dict]) -> ChinchillaLaw:
    return fit_chinchilla([r["params"] for r in records], [r["tokens"] for r in records],
                          [r["loss"] for r in records])[0]


def held_out_check(records: list[dict]) -> dict:
    """The law fitted without the largest budget, and how well it predicts that budget."""
    groups = _by_budget(records)
    if len(groups) < 3:
        raise ScratchError("the held-out check needs at least 3 budgets (2 to fit, 1 to "
                           "predict)")
    *seen, last = groups
    law = _law([r for b in seen for r in groups[b]])
    runs = groups[last]
    predicted = [float(law.loss(r["params"], r["tokens"])) for r in runs]
    observed = [r["loss"] for r in runs]
    best_pred, best_obs = min(predicted), min(observed)
    return {"budget": last, "fit_budgets": seen, "law": law.as_dict(),
            "runs": [{"name": r["name"], "predicted": p, "observed": o}
                     for r, p, o in zip(runs, predicted, observed)],
            "predicted_best": best_pred, "observed_best": best_obs,
            "relative_error": best_pred / best_obs - 1}


def fit_sweep(records: list[dict], flops: str = "model", bootstrap: int = 100) -> dict:
    """Approach 3 on every run (with bootstrap intervals), approach 2 per budget with its
    exponents, and the held-out check: one JSON-ready dict."""
    if len(records) < 5:
        raise ScratchError(f"the sweep has {len(records)} finished runs; the fits need at "
                           "least 5")
    law = _law(records)
    n, d, loss = ([r[k] for r in records] for k in ("params", "tokens", "loss"))
    intervals = bootstrap_chinchilla(n, d, loss, law, rounds=bootstrap) if bootstrap else {}
    profiles = []
    for budget, runs in _by_budget(records).items():
        p = isoflop_profile(budget, [r["params"] for r in runs], [r["tokens"] for r in runs],
                            [r["loss"] for r in runs])
        profiles.append({"budget": budget, "runs": len(runs), **(
            {"n_opt": p.n_opt, "d_opt": p.d_opt, "loss_opt": p.loss_opt, "coef": p.coef}
            if p else {"n_opt": None})})
    vertices = [p for p in profiles if p["n_opt"] is not None]
    exponents = None
    # Two vertices fit any power law exactly (and two noisy ones give any exponent): the
    # exponents are a measurement from three on.
    if len(vertices) >= MIN_VERTICES:
        n_law = fit_power_law([p["budget"] for p in vertices], [p["n_opt"] for p in vertices])
        d_law = fit_power_law([p["budget"] for p in vertices], [p["d_opt"] for p in vertices])
        exponents = {"a": n_law.exponent, "b": d_law.exponent, "k_n": n_law.k,
                     "k_d": d_law.k}
    out = {"flops": flops, "runs": len(records), "law": law.as_dict(),
           "intervals": intervals, "isoflop": profiles, "exponents": exponents}
    if len(_by_budget(records)) >= 3:
        out["held_out"] = held_out_check(records)
    return out


# ------------------------------------------------------------------------------------------------
# plans


def plan(budget: float, fit: dict | None = None, law_name: str | None = None) -> dict:
    """The compute-optimal N and D at `budget` FLOPs and the predicted loss: from the
    parametric law (C = 6ND, closed form) and, with a sweep's fit, from its IsoFLOP power
    laws (in the sweep's FLOP count)."""
    if budget <= 0 or not math.isfinite(budget):
        raise ScratchError(f"--budget must be a positive number of FLOPs, got {budget:g}")
    if fit is None and law_name is None:
        raise ScratchError("give --sweep DIR (a fitted sweep) or --law hoffmann|epoch")
    if law_name is not None and law_name not in PUBLISHED:
        raise ScratchError(f"--law must be one of {sorted(PUBLISHED)}, got {law_name!r}")
    law = PUBLISHED[law_name] if law_name else ChinchillaLaw(
        **{k: fit["law"][k] for k in ("E", "A", "B", "alpha", "beta")})
    n_opt, d_opt = law.optimal(budget)
    out = {"budget": budget, "law": law_name or "fitted",
           "parametric": {"params": n_opt, "tokens": d_opt, "tokens_per_param": d_opt / n_opt,
                          "loss": float(law.loss(n_opt, d_opt))}}
    if fit is not None and fit.get("exponents"):
        e = fit["exponents"]
        n2, d2 = e["k_n"] * budget ** e["a"], e["k_d"] * budget ** e["b"]
        out["isoflop"] = {"params": n2, "tokens": d2, "tokens_per_param": d2 / n2,
                          "loss": float(law.loss(n2, d2)), "flops": fit["flops"]}
    return out


def format_plan(p: dict) -> str:
    lines = [f"compute budget {p['budget']:.3g} FLOPs"]
    rows = [("parametric law (" + p["law"] + ", C = 6ND)", p["parametric"])]
    if "isoflop" in p:
        rows.append((f"IsoFLOP power laws (C counted as {p['isoflop']['flops']})",
                     p["isoflop"]))
    for label, r in rows:
        lines.append(f"  {label}: N = {r['params']:.4g} parameters, D = {r['tokens']:.4g} "
                     f"tokens ({r['tokens_per_param']:.1f} tokens per parameter), predicted "
                     f"loss {r['loss']:.4f}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# the report


def _fmt(x: float | None, spec: str = ".4g") -> str:
    return "" if x is None else format(x, spec)


def report_markdown(records: list[dict], fit: dict) -> str:
    law = fit["law"]
    ci = fit.get("intervals") or {}
    lines = ["## Runs", "",
             "| run | N | D | D/N | C (6ND) | C (model) | val loss |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in records:
        lines.append(f"| {r['name']} | {r['params']:,} | {r['tokens']:,} "
                     f"| {r['tokens'] / r['params']:.1f} | {r['flops_6nd']:.3g} "
                     f"| {r['flops_model']:.3g} | {r['loss']:.4f} |")
    lines += ["", "## Parametric fit: L(N, D) = E + A / N^α + B / D^β", "",
              "| constant | this sweep | 90% bootstrap interval | Hoffmann et al. 2022 "
              "| Besiroglu et al. 2024 (Epoch AI) |", "|---|---:|---|---:|---:|"]
    for key in ("E", "A", "B", "alpha", "beta", "a", "b"):
        interval = f"{_fmt(ci[key][0])} – {_fmt(ci[key][1])}" if key in ci else ""
        lines.append(f"| {key} | {law[key]:.4g} | {interval} "
                     f"| {HOFFMANN.as_dict()[key]:.4g} | {EPOCH.as_dict()[key]:.4g} |")
    lines += ["", f"## IsoFLOP profiles (C counted as {fit['flops']})", "",
              "| budget | runs | N_opt | D_opt | D/N | loss at the vertex |",
              "|---:|---:|---:|---:|---:|---:|"]
    for p in fit["isoflop"]:
        if p["n_opt"] is None:
            lines.append(f"| {p['budget']:.3g} | {p['runs']} | no vertex among the sizes "
                         "tried | | | |")
        else:
            lines.append(f"| {p['budget']:.3g} | {p['runs']} | {p['n_opt']:.4g} "
                         f"| {p['d_opt']:.4g} | {p['d_opt'] / p['n_opt']:.1f} "
                         f"| {p['loss_opt']:.4f} |")
    published = ("Hoffmann et al. found a = 0.50, b = 0.50 (approach 2) and 0.46, 0.54 "
                 "(approach 3), Besiroglu et al. 0.51, 0.49.")
    if fit.get("exponents"):
        e = fit["exponents"]
        lines += ["", f"N_opt ∝ C^{e['a']:.3f}, D_opt ∝ C^{e['b']:.3f} (IsoFLOP vertices); "
                      f"the parametric law gives a = {law['a']:.3f}, b = {law['b']:.3f}; "
                      + published]
    else:
        found = sum(p["n_opt"] is not None for p in fit["isoflop"])
        lines += ["", f"IsoFLOP exponents: not measured, {found} budget(s) with a vertex among "
                      f"the sizes tried and a power law needs {MIN_VERTICES}; the parametric "
                      f"law gives N_opt ∝ C^{law['a']:.3f}, D_opt ∝ C^{law['b']:.3f}; "
                      + published]
    if "held_out" in fit:
        h = fit["held_out"]
        lines += ["", "## Held-out prediction", "",
                  f"Fitted on the budgets {', '.join(f'{b:.3g}' for b in h['fit_budgets'])}; "
                  f"predicting the budget {h['budget']:.3g}:", "",
                  "| run | predicted loss | observed loss |", "|---|---:|---:|"]
        lines += [f"| {r['name']} | {r['predicted']:.4f} | {r['observed']:.4f} |"
                  for r in h["runs"]]
        lines += ["", f"Best loss at {h['budget']:.3g} FLOPs: predicted "
                      f"{h['predicted_best']:.4f}, observed {h['observed_best']:.4f}, error "
                      f"{100 * h['relative_error']:+.2f}%."]
    return "\n".join(lines) + "\n"


def plot_sweep(records: list[dict], fit: dict, out: Path) -> list[Path]:
    """loss_vs_compute.png, isoflop.png, frontier.png in `out`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker
    import numpy as np

    from scratchlm.utils import atomic_path

    key = "flops_model" if fit["flops"] == "model" else "flops_6nd"
    law = ChinchillaLaw(**{k: fit["law"][k] for k in ("E", "A", "B", "alpha", "beta")})
    paths = []

    def save(fig, name: str) -> None:
        with atomic_path(out / name) as tmp:
            fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
        plt.close(fig)
        paths.append(out / name)

    fig, ax = plt.subplots(figsize=(6, 4))
    by_size: dict[str, list[dict]] = defaultdict(list)
    for r in records:
        by_size[r["size"]].append(r)
    for size, runs in sorted(by_size.items(), key=lambda kv: kv[1][0]["params"]):
        runs.sort(key=lambda r: r[key])
        ax.plot([r[key] for r in runs], [r["loss"] for r in runs], "o-",
                label=f"{size} ({runs[0]['params'] / 1e3:.0f}k)")
    ax.set(xscale="log", xlabel=f"compute (FLOPs, {fit['flops']} count)",
           ylabel="validation loss (nats/token)", title="Loss vs compute per model size")
    ax.legend(fontsize=7)
    save(fig, "loss_vs_compute.png")

    fig, ax = plt.subplots(figsize=(6, 4))
    for p, (budget, runs) in zip(fit["isoflop"], _by_budget(records).items()):
        line, = ax.plot([r["params"] for r in runs], [r["loss"] for r in runs], "o",
                        label=f"{budget:.3g}")
        if p["n_opt"] is not None:
            xs = np.linspace(math.log(min(r["params"] for r in runs)),
                             math.log(max(r["params"] for r in runs)), 50)
            c0, c1, c2 = p["coef"]
            ax.plot(np.exp(xs), c0 + c1 * xs + c2 * xs ** 2, "-", color=line.get_color())
            ax.plot([p["n_opt"]], [p["loss_opt"]], "*", ms=12, color=line.get_color())
    ax.set(xscale="log", xlabel="parameters N", ylabel="validation loss (nats/token)",
           title="IsoFLOP profiles (stars: vertices)")
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # crowded on a short axis
    ax.legend(title="budget (FLOPs)", fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    save(fig, "isoflop.png")

    fig, ax = plt.subplots(figsize=(6, 4))
    budgets = np.geomspace(min(r["budget"] for r in records) / 2,
                           max(r["budget"] for r in records) * 4, 50)
    n_par, d_par = zip(*(law.optimal(c) for c in budgets))
    ax.plot(budgets, n_par, "-", color="C0", label="N_opt, parametric (C = 6ND)")
    ax.plot(budgets, d_par, "-", color="C1", label="D_opt, parametric (C = 6ND)")
    vertices = [p for p in fit["isoflop"] if p["n_opt"] is not None]
    ax.plot([p["budget"] for p in vertices], [p["n_opt"] for p in vertices], "o", color="C0",
            label="N_opt, IsoFLOP vertices")
    ax.plot([p["budget"] for p in vertices], [p["d_opt"] for p in vertices], "s", color="C1",
            label="D_opt, IsoFLOP vertices")
    if fit.get("exponents"):
        e = fit["exponents"]
        ax.plot(budgets, e["k_n"] * budgets ** e["a"], "--", color="C0",
                label=f"N ∝ C^{e['a']:.2f}")
        ax.plot(budgets, e["k_d"] * budgets ** e["b"], "--", color="C1",
                label=f"D ∝ C^{e['b']:.2f}")
    ax.set(xscale="log", yscale="log", xlabel="compute (FLOPs)",
           ylabel="parameters / tokens", title="The compute-optimal frontier")
    ax.legend(fontsize=7)
    save(fig, "frontier.png")
    return paths


def write_fit(sweep_dir: str | Path, bootstrap: int = 100, plots: bool = True) -> dict:
    """Fit the sweep in `sweep_dir`; write fit/fit.json, fit/report.md and the plots."""
    from scratchlm.scaling.sweep import read_results
    from scratchlm.utils import atomic_write_text

    sweep_dir = Path(sweep_dir)
    records = read_results(sweep_dir)
    flops = json.loads((sweep_dir / "sweep.json").read_text())["flops"]
    fit = fit_sweep(records, flops, bootstrap)
    out = sweep_dir / "fit"
    atomic_write_text(out / FIT, json.dumps(fit, indent=2))
    atomic_write_text(out / "report.md", report_markdown(records, fit))
    if plots:
        fit["plots"] = [str(p) for p in plot_sweep(records, fit, out)]
    return fit


def read_fit(sweep_dir: str | Path) -> dict:
    """fit/fit.json of a sweep, made by `scratchlm scaling fit`."""
    path = Path(sweep_dir) / "fit" / FIT
    if not path.is_file():
        raise ScratchError(f"{path}: no fit; run `scratchlm scaling fit --sweep {sweep_dir}` "
                           "first")
    return json.loads(path.read_text(encoding="utf-8"))
