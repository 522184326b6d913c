"""Scaling laws: the parametric fit recovers the constants it was made from, our batched
L-BFGS ends where scipy's does, the compute-optimal closed form is the numeric minimum,
IsoFLOP vertices find the optimum; a real (tiny) sweep trains, skips what is finished,
records both FLOP counts and is fitted; bad budgets are refused before anything is written."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from scratchlm.cli import main
from scratchlm.errors import ScratchError
from scratchlm.scaling.laws import (
    EPOCH,
    HOFFMANN,
    ChinchillaLaw,
    _objective,
    fit_chinchilla,
    fit_power_law,
    isoflop_profile,
    lbfgs_batch,
)

TRUE = ChinchillaLaw(E=1.9, A=300.0, B=900.0, alpha=0.40, beta=0.33)


def isoflop_grid(law: ChinchillaLaw, budgets, spread: float = 8.0, per_budget: int = 6):
    """Runs on IsoFLOP lines (C = 6ND) around each budget's optimum."""
    n, d = [], []
    for c in budgets:
        n_opt, _ = law.optimal(c)
        for x in n_opt * np.geomspace(1 / spread, spread, per_budget):
            n.append(x)
            d.append(c / (6 * x))
    return np.array(n), np.array(d)


def test_fit_recovers_known_constants_from_noisy_losses() -> None:
    n, d = isoflop_grid(TRUE, np.geomspace(1e16, 1e19, 4))
    noise = np.random.default_rng(1).normal(0, 0.003, len(n))  # 0.3% on each loss
    law, objective = fit_chinchilla(n, d, TRUE.loss(n, d) * np.exp(noise))
    assert law.E == pytest.approx(TRUE.E, rel=0.03)
    assert law.alpha == pytest.approx(TRUE.alpha, abs=0.03)
    assert law.beta == pytest.approx(TRUE.beta, abs=0.03)
    assert law.A == pytest.approx(TRUE.A, rel=0.3) and law.B == pytest.approx(TRUE.B, rel=0.3)
    assert law.a == pytest.approx(TRUE.a, abs=0.02) and law.b == pytest.approx(TRUE.b, abs=0.02)
    assert law.optimal(1e20)[0] == pytest.approx(TRUE.optimal(1e20)[0], rel=0.15)
    assert objective < 1e-3 * len(n)
    with pytest.raises(ScratchError, match="needs at least 5 runs"):
        fit_chinchilla(n[:4], d[:4], TRUE.loss(n[:4], d[:4]))


def test_batched_lbfgs_ends_where_scipys_least_squares_does() -> None:
    """scipy's least_squares with loss="huber" and f_scale = delta minimises the same summed
    Huber loss (0.5 r^2 inside delta, delta |r| - delta^2 / 2 outside) by another method
    (trust region): from the same starts, ours ends at the same minimum, or a lower one where
    the reference stops early."""
    from scipy.optimize import least_squares

    n, d = isoflop_grid(TRUE, np.geomspace(1e16, 1e19, 4))
    noisy = TRUE.loss(n, d) * np.exp(np.random.default_rng(2).normal(0, 0.004, len(n)))
    args = (np.log(n), np.log(d), np.log(noisy), 1e-3)
    truth = np.array([math.log(TRUE.A), math.log(TRUE.B), math.log(TRUE.E), TRUE.alpha,
                      TRUE.beta])
    starts = truth + np.random.default_rng(0).normal(0, [1.0, 1.0, 0.3, 0.05, 0.05], (5, 5))
    ends, values = lbfgs_batch(lambda th, _: _objective(th, *args), starts, iters=3000,
                               tol=1e-14)

    def residuals(theta):
        a, b, e, alpha, beta = theta
        return np.logaddexp(np.logaddexp(a - alpha * args[0], b - beta * args[1]), e) - args[2]

    refs = [least_squares(residuals, start, loss="huber", f_scale=1e-3, xtol=1e-15,
                          ftol=1e-15, gtol=1e-15, max_nfev=5000) for start in starts]
    same = 0
    for end, value, ref in zip(ends, values, refs):
        assert value <= ref.cost * (1 + 1e-4)  # never worse than the reference
        if value == pytest.approx(ref.cost, rel=1e-4):
            same += 1
            assert end[3:] == pytest.approx(ref.x[3:], abs=1e-3)  # alpha, beta
    assert same >= 2
    assert values.min() == pytest.approx(min(r.cost for r in refs), rel=1e-4)


@pytest.mark.parametrize("law", [HOFFMANN, EPOCH, TRUE])
def test_compute_optimal_closed_form_is_the_numeric_minimum(law: ChinchillaLaw) -> None:
    for c in (1e18, 1e21, 5.76e23):
        grid = np.geomspace(1e3, 1e15, 400_001)
        numeric = grid[np.argmin(law.loss(grid, c / (6 * grid)))]
        n_opt, d_opt = law.optimal(c)
        assert n_opt == pytest.approx(numeric, rel=1e-3)
        assert 6 * n_opt * d_opt == pytest.approx(c)
    # Chinchilla's own budget: Epoch AI's constants give its 70B parameters on 1.4T tokens.
    n_opt, d_opt = EPOCH.optimal(5.76e23)
    assert 65e9 < n_opt < 80e9 and 1.2e12 < d_opt < 1.5e12


def test_isoflop_vertices_find_the_optimum_and_its_exponents() -> None:
    budgets = np.geomspace(1e17, 1e20, 5)
    n, d = isoflop_grid(TRUE, budgets, spread=4.0, per_budget=9)
    loss = TRUE.loss(n, d)
    profiles = [isoflop_profile(c, n[i * 9:(i + 1) * 9], d[i * 9:(i + 1) * 9],
                                loss[i * 9:(i + 1) * 9]) for i, c in enumerate(budgets)]
    for p, c in zip(profiles, budgets):
        n_opt, d_opt = TRUE.optimal(c)
        assert p.n_opt == pytest.approx(n_opt, rel=0.1)
        assert p.d_opt == pytest.approx(d_opt, rel=0.1)
        assert p.loss_opt == pytest.approx(TRUE.loss(n_opt, d_opt), rel=1e-3)
    assert fit_power_law(budgets, [p.n_opt for p in profiles]).exponent == pytest.approx(
        TRUE.a, abs=0.02)
    assert fit_power_law(budgets, [p.d_opt for p in profiles]).exponent == pytest.approx(
        TRUE.b, abs=0.02)
    # losses still falling at the largest size: the optimum was not among the sizes tried
    assert isoflop_profile(1e18, [1e6, 2e6, 4e6], [1e9, 5e8, 2.5e8], [3.0, 2.8, 2.7]) is None


# ------------------------------------------------------------------------------------------------
# sweeps


def tiny_sweep_args(prepared, out: Path, budgets: str) -> list[str]:
    tok_dir, data_dir = prepared
    return ["scaling", "sweep", "--out", str(out), "--config", "tiny-cpu", "--budgets", budgets,
            "--sizes", "1x16,1x32,2x32", "--quiet", f"--tokenizer.path={tok_dir}",
            f"--data.shards={data_dir}", "--sweep.min_steps=2", "--train.eval_batches=2",
            "--train.checkpoint_every=0", "--train.warmup_steps=2",
            "--sweep.tokens_per_param=[0.01,10000]"]


def test_sweep_budget_too_small_is_refused_before_writing(prepared, tmp_path: Path,
                                                          capsys) -> None:
    out = tmp_path / "sweep"
    assert main(tiny_sweep_args(prepared, out, "1e6,1e7")) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "budget 1e+06 FLOPs trains the smallest size (1x16, " in err
    assert "raise the budget to at least" in err
    assert not out.exists()
    assert main(tiny_sweep_args(prepared, out, "3e9") + ["--sizes", "1x16,1x40"]) == 2
    assert "must be a multiple of sweep.head_dim" in capsys.readouterr().err
    assert main(tiny_sweep_args(prepared, out, "3e9") + ["--sizes", "1x16,2x32"]) == 2
    assert "an IsoFLOP parabola needs 3" in capsys.readouterr().err


@pytest.mark.slow
def test_sweep_trains_records_both_flop_counts_and_skips_finished_runs(
        prepared, tmp_path: Path, capsys) -> None:
    """One budget of three sizes (an IsoFLOP parabola's fewest), a few steps each; the fits,
    plots and plans of a sweep are tested on a synthetic one below, and on a real one of 16
    runs in bench/bench_scaling.py."""
    from scratchlm.memory import flops_per_token
    from scratchlm.model.checkpoint import load_config

    out = tmp_path / "sweep"
    args = tiny_sweep_args(prepared, out, "6e9")
    assert main(args) == 0
    records = json.loads((out / "sweep.json").read_text())["runs"]
    assert len(records) == 3 and {r["size"] for r in records} == {"1x16", "1x32", "2x32"}
    for r in records:
        summary = json.loads((Path(r["run"]) / "summary.json").read_text())
        assert (Path(r["run"]) / "final" / "model.safetensors").is_file()
        assert summary["parameters"] == r["params"] and summary["tokens"] == r["tokens"]
        assert r["flops_6nd"] == 6 * r["params"] * r["tokens"]
        cfg = load_config(Path(r["run"]) / "final")
        assert r["flops_model"] == pytest.approx(flops_per_token(cfg, 128) * r["tokens"])
        # the budget becomes tokens through the model's own count, to within one step
        assert abs(r["flops_model"] - r["budget"]) <= flops_per_token(cfg, 128) * 2048 / 2
        assert r["loss"] == summary["val"]["loss"]
    stamps = {r["run"]: (Path(r["run"]) / "summary.json").stat().st_mtime_ns for r in records}
    capsys.readouterr()
    assert main(args) == 0  # again: every run is finished, nothing trains
    assert capsys.readouterr().out.count("finished, skipped") == 3
    assert stamps == {r: (Path(r) / "summary.json").stat().st_mtime_ns for r in stamps}
    assert main(["scaling", "fit", "--sweep", str(out)]) == 2
    assert "the sweep has 3 finished runs; the fits need at least 5" in \
        capsys.readouterr().err
    other = tiny_sweep_args(prepared, out, "6e9,1.2e10")
    assert main(other) == 2
    assert "holds a sweep with other settings" in capsys.readouterr().err


def test_fit_of_a_sweep_predicts_its_held_out_budget(tmp_path: Path, capsys) -> None:
    """`scaling fit` on a sweep whose losses come from known constants (with 0.2% noise):
    the law fitted without the largest budget predicts that budget's best loss, the report
    shows the constants beside the published ones, the IsoFLOP exponents are the law's, the
    plots are drawn and `plan` reads the fit."""
    budgets = [1e16, 1e17, 1e18, 1e19]
    n, d = isoflop_grid(TRUE, budgets, spread=6.0, per_budget=5)
    loss = TRUE.loss(n, d) * np.exp(np.random.default_rng(3).normal(0, 0.002, len(n)))
    records = [{"name": f"C{c:.0e}-{i}", "budget": c, "size": f"{i}x{i}", "params": float(p),
                "tokens": float(t), "loss": float(x), "flops_6nd": 6 * p * t,
                "flops_model": 6 * p * t}
               for i, (c, p, t, x) in enumerate(zip(np.repeat(budgets, 5), n, d, loss))]
    (tmp_path / "sweep.json").write_text(json.dumps({"flops": "6nd", "runs": records}))
    assert main(["scaling", "fit", "--sweep", str(tmp_path), "--bootstrap", "20"]) == 0
    report = capsys.readouterr().out
    for name in ("loss_vs_compute.png", "isoflop.png", "frontier.png", "report.md"):
        assert (tmp_path / "fit" / name).stat().st_size > 0
    fit = json.loads((tmp_path / "fit" / "fit.json").read_text())
    held = fit["held_out"]
    assert held["fit_budgets"] == budgets[:3] and held["budget"] == budgets[3]
    assert abs(held["relative_error"]) < 0.01
    assert f"error {100 * held['relative_error']:+.2f}%" in report
    assert "| alpha |" in report and "| 0.34 | 0.3478 |" in report
    assert fit["law"]["alpha"] == pytest.approx(TRUE.alpha, abs=0.05)
    assert fit["exponents"]["a"] == pytest.approx(TRUE.a, abs=0.05)
    low, high = fit["intervals"]["alpha"]
    assert low <= fit["law"]["alpha"] <= high
    assert main(["scaling", "plan", "--budget", "1e20", "--sweep", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    n_opt, d_opt = ChinchillaLaw(**{k: fit["law"][k] for k in ("E", "A", "B", "alpha",
                                                                "beta")}).optimal(1e20)
    assert f"parametric law (fitted, C = 6ND): N = {n_opt:.4g} parameters" in out
    assert "IsoFLOP power laws (C counted as 6nd)" in out


def test_plan_command(capsys) -> None:
    assert main(["scaling", "plan", "--budget", "5.76e23", "--law", "epoch"]) == 0
    out = capsys.readouterr().out
    n_opt, d_opt = EPOCH.optimal(5.76e23)
    assert f"N = {n_opt:.4g} parameters, D = {d_opt:.4g} tokens" in out
    assert main(["scaling", "plan", "--budget", "1e20"]) == 2
    assert "give --sweep DIR" in capsys.readouterr().err
    assert main(["scaling", "fit", "--sweep", "/nonexistent/sweep"]) == 2
    assert "no sweep results" in capsys.readouterr().err


@pytest.mark.parametrize("mlp", ["gelu", "gelu_exact", "relu2", "swiglu"])
def test_sweep_shapes_give_every_mlp_the_same_parameters_per_layer(mlp: str) -> None:
    """A sweep size's MLP: 4x wide for the one-matrix kinds (GELU, ReLU², as ModelConfig's own
    default), 8/3x for SwiGLU's two matrices, so that 2 x 192 means one size whatever the MLP
    (ReLU² once got SwiGLU's width: a third fewer MLP parameters)."""
    from scratchlm.model import ModelConfig
    from scratchlm.scaling.sweep import shape

    cfg = shape(ModelConfig(mlp=mlp), "2x192", 64, 1000)
    assert (cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.vocab_size) == (2, 192, 3, 1000)
    matrices = 3 if mlp == "swiglu" else 2
    assert matrices * cfg.intermediate_size * 192 == pytest.approx(8 * 192 * 192, rel=0.01)
