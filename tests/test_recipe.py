"""The pretraining recipe's levers (issue 17): Muon against an SVD reference, under DDP and ZeRO,
and through a resume; the warmup-stable-decay schedule and the time budget it follows; the
block variants (QK-norm, ReLU², logit soft-cap, zero-init, untied head with its own lr)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from scratchlm.config import Config, load_config
from scratchlm.data.prepare import tokenizer_fingerprint
from scratchlm.errors import ScratchError
from scratchlm.model.config import ModelConfig
from scratchlm.model.gpt import GPT
from scratchlm.model.hf import config_to_hf, family
from scratchlm.tokenizer import BPETokenizer
from scratchlm.train.muon import NS_COEFFICIENTS, MuonAdamW, newton_schulz
from scratchlm.train.optim import build_optimizer, param_groups, recipe_groups
from scratchlm.train.pretrain import PretrainObjective, build_model, ensure_data, ensure_tokenizer
from scratchlm.train.schedule import lr_at, run_position, warmup_length
from scratchlm.train.trainer import Trainer

from helpers import losses, run_plan

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def one_thread():
    """Small linear algebra on one thread: with two OpenMP threads on a busy 2-core machine a
    96 x 32 SVD took a second of spinning instead of a millisecond, and Muon's small
    Newton-Schulz matmuls likewise (a resumed run compares with itself, whatever the
    threads)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def small(shakespeare: str, tmp_path_factory) -> tuple[Path, Path]:
    """A 320-token tokenizer and shards of 60 kB of Tiny Shakespeare (8 kB held out): a quarter
    of a second to build, against tens of seconds for the tiny-cpu recipe's own."""
    out = tmp_path_factory.mktemp("recipe-data")
    (out / "train.txt").write_text(shakespeare[:60_000], encoding="utf-8")
    (out / "val.txt").write_text(shakespeare[-8_000:], encoding="utf-8")
    cfg = load_config(Config, ROOT / "configs" / "tiny-cpu.yaml", [
        "--tokenizer.vocab_size=320", f"--data.inputs=[{out / 'train.txt'}]",
        f"--data.val_inputs=[{out / 'val.txt'}]", "--data.filters.preset=none",
        "--data.dedup.near=false", "--data.workers=1"])
    tok_dir = ensure_tokenizer(cfg, out, progress=False)
    return tok_dir, ensure_data(cfg, out, tok_dir, progress=False)


def flags(small: tuple[Path, Path], *overrides: str) -> list[str]:
    """tiny-cpu on the small data, every lever of the recipe on, no samples."""
    return [f"--tokenizer.path={small[0]}", f"--data.shards={small[1]}",
            "--train.optimizer=muon", "--train.schedule=wsd", "--train.warmup_steps=2",
            "--train.eval_batches=1", "--train.sample_tokens=0", "--model.qk_norm=true",
            "--model.mlp=relu2", "--model.logit_softcap=15", "--model.zero_init=true",
            "--model.tie_embeddings=false", "--train.head_lr=0.004",
            "--train.embedding_lr=0.01", *overrides]


def make_trainer(small: tuple[Path, Path], out: Path, *overrides: str,
                 resume: bool = False, progress: bool = False) -> Trainer:
    cfg = load_config(Config, ROOT / "configs" / "tiny-cpu.yaml", flags(small, *overrides))
    tok = BPETokenizer.load(small[0])
    model, cfg = build_model(cfg, tok)
    objective = PretrainObjective(small[1], tok, tokenizer_fingerprint(small[0]),
                                  cfg.model.block_size, cfg.model.vocab_size,
                                  cfg.train.eval_batches, cfg.train.sample_tokens)
    return Trainer(cfg.train, cfg.parallel, model, objective, out, cfg, tok, resume,
                   progress=progress)


# ------------------------------------------------------------------------------------------------
# Muon


def spectrum_matrix(rows: int, cols: int, singular: torch.Tensor, seed: int = 0
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(G = U diag(singular) V^T, U, V) with random orthonormal U (rows, r) and V (cols, r)."""
    g = torch.Generator().manual_seed(seed)
    r = min(rows, cols)
    u = torch.linalg.qr(torch.randn(rows, r, generator=g, dtype=torch.float64))[0]
    v = torch.linalg.qr(torch.randn(cols, r, generator=g, dtype=torch.float64))[0]
    return (u * singular.double()) @ v.T, u, v


@pytest.mark.parametrize("shape", [(48, 96), (96, 48), (64, 64)])
def test_newton_schulz_is_the_polar_factor_up_to_the_quintics_spread(shape, one_thread
                                                                     ) -> None:
    """NS(G) keeps G's singular vectors exactly and moves every singular value into the band
    the quintic is tuned for (about 0.7 to 1.2, Jordan et al.), instead of to exactly 1: so it
    is U V^T (the SVD's answer) up to that spread. Singular values down to 1/200 of the
    largest are covered; five rounds lift anything above ~1/a^5 (a = 3.4445) of the norm."""
    rows, cols = shape
    r = min(rows, cols)
    s = torch.logspace(0, -2.3, r)  # 1 down to 1/200
    g, u, v = spectrum_matrix(rows, cols, s)
    o = newton_schulz(g.float()).double()
    inner = u.T @ o @ v  # (r, r): diagonal when NS keeps U and V
    diag = inner.diagonal()
    assert (inner - torch.diag(diag)).abs().max() < 1e-4
    assert diag.min() > 0.6 and diag.max() < 1.25, (diag.min(), diag.max())
    # Against the direct reference, U V^T from the SVD of G itself.
    U, _, Vh = torch.linalg.svd(g, full_matrices=False)
    polar = U @ Vh
    rel = (o - polar).norm() / polar.norm()
    assert rel < 0.3
    cosine = (o * polar).sum() / (o.norm() * polar.norm())
    assert cosine > 0.95
    # A transposed input gives the transposed output (the iteration runs on the wide form).
    torch.testing.assert_close(newton_schulz(g.T.float()), newton_schulz(g.float()).T)


def test_newton_schulz_coefficients_lift_small_singular_values() -> None:
    """p(s) = a s + b s^3 + c s^5 rises at slope a > 3 from zero and stays in a band near 1
    on (0.1, 1]: the reason five rounds suffice."""
    a, b, c = NS_COEFFICIENTS
    s = torch.linspace(0.1, 1, 100, dtype=torch.float64)
    for _ in range(5):
        s = a * s + b * s**3 + c * s**5
    assert s.min() > 0.6 and s.max() < 1.25
    assert a > 3


def reference_muon_update(grad: torch.Tensor, buf: torch.Tensor, beta: float) -> torch.Tensor:
    """Muon written directly: Nesterov momentum, then the exact U V^T of an SVD, scaled by
    sqrt(max(1, rows / cols)). `buf` is updated in place."""
    buf.mul_(beta).add_(grad, alpha=1 - beta)
    look_ahead = grad + beta * (buf - grad)
    U, _, Vh = torch.linalg.svd(look_ahead.double(), full_matrices=False)
    rows, cols = grad.shape
    return (U @ Vh).float() * max(1.0, rows / cols) ** 0.5


def test_muon_step_follows_an_svd_reference(one_thread) -> None:
    torch.manual_seed(0)
    tall = torch.nn.Parameter(torch.randn(96, 32) * 0.02)
    wide = torch.nn.Parameter(torch.randn(32, 96) * 0.02)
    lr, wd, beta = 0.02, 0.1, 0.95
    opt = MuonAdamW([{"params": [tall, wide], "use_muon": True, "weight_decay": wd}], lr=lr,
                    momentum=beta)
    bufs = {id(p): torch.zeros_like(p) for p in (tall, wide)}
    for _ in range(3):
        before = {id(p): p.detach().clone() for p in (tall, wide)}
        for p in (tall, wide):
            p.grad = torch.randn_like(p)
        expected = {id(p): reference_muon_update(p.grad, bufs[id(p)], beta)
                    for p in (tall, wide)}
        opt.step()
        for p in (tall, wide):
            # Momentum is the same arithmetic: equal to float rounding.
            torch.testing.assert_close(opt.state[p]["momentum_buffer"], bufs[id(p)])
            step = (p.detach() - before[id(p)] * (1 - lr * wd)) / -lr
            ref = expected[id(p)]
            assert (step - ref).norm() / ref.norm() < 0.3
            assert (step * ref).sum() / (step.norm() * ref.norm()) > 0.95


@pytest.mark.parametrize("kernel", [dict(foreach=True), dict(fused=True)])
def test_muon_adamw_groups_are_torch_adamw(kernel) -> None:
    """MuonAdamW's AdamW groups run torch's own kernels (foreach, and fused, which the loop
    uses on a CPU and a GPU): the same weights as torch.optim.AdamW, bit for bit."""
    torch.manual_seed(0)
    a = [torch.nn.Parameter(torch.randn(8, 4)), torch.nn.Parameter(torch.randn(4))]
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    groups = lambda ps: [{"params": ps[:1], "weight_decay": 0.1},  # noqa: E731
                         {"params": ps[1:], "weight_decay": 0.0}]
    ours = MuonAdamW(groups(a), lr=1e-2, betas=(0.9, 0.95), **kernel)
    theirs = torch.optim.AdamW(groups(b), lr=1e-2, betas=(0.9, 0.95), **kernel)
    for _ in range(4):
        grads = [torch.randn_like(p) for p in a]
        for p, q, g in zip(a, b, grads):
            p.grad, q.grad = g.clone(), g.clone()
        ours.step()
        theirs.step()
    for p, q in zip(a, b):
        assert torch.equal(p, q)


def test_muon_refuses_a_group_that_is_not_matrices() -> None:
    with pytest.raises(ScratchError, match="not 2-D"):
        MuonAdamW([{"params": [torch.nn.Parameter(torch.zeros(4))], "use_muon": True}])


def dict_replace(cfg: ModelConfig, **changes) -> ModelConfig:
    return ModelConfig(**{**cfg.to_dict(), **changes})


def test_recipe_groups_split_muon_embeddings_head(small) -> None:
    cfg = load_config(Config, ROOT / "configs" / "tiny-cpu.yaml", flags(small))
    model = GPT(dict_replace(cfg.model, vocab_size=320))
    groups = recipe_groups(param_groups(model, 0.1), model, cfg.train)
    names = {id(p): n for n, p in model.named_parameters()}
    kinds: dict[str, tuple[bool, float]] = {}
    for g in groups:
        for p in g["params"]:
            kinds[names[id(p)]] = (g["use_muon"], g["lr_scale"])
    t = cfg.train
    for name, (muon, scale) in kinds.items():
        if name == "lm_head.weight":
            assert not muon and scale == pytest.approx(t.head_lr / t.lr)
        elif name == "tok_emb.weight":
            assert not muon and scale == pytest.approx(t.embedding_lr / t.lr)
        elif name.startswith("blocks.") and name.endswith(".weight") and "norm" not in name:
            assert muon and scale == pytest.approx(t.muon_lr / t.lr), name
        else:  # norms
            assert not muon and scale == 1.0, name
    assert isinstance(build_optimizer(groups, t.lr, (0.9, 0.95)), MuonAdamW)
    # A tied head has no learning rate of its own to give.
    tied = load_config(Config, ROOT / "configs" / "tiny-cpu.yaml",
                       flags(small, "--model.tie_embeddings=true"))
    tied_model = GPT(dict_replace(tied.model, vocab_size=320))
    with pytest.raises(ScratchError, match="head_lr: the head is tied"):
        recipe_groups(param_groups(tied_model, 0.1), tied_model, tied.train)


def test_layer_decay_lowers_lr_block_by_block(small) -> None:
    """train.layer_decay: block i of n trains at decay^(n - i) of its kind's lr, the
    embeddings at decay^(n + 1), the final norm and the head at their own lr; with Muon the
    matrices keep Muon's lr times the same factor."""
    decay = 0.5
    cfg = load_config(Config, ROOT / "configs" / "tiny-cpu.yaml",
                      flags(small, f"--train.layer_decay={decay}"))
    model = GPT(dict_replace(cfg.model, vocab_size=320))
    n, t = model.config.n_layer, cfg.train
    groups = recipe_groups(param_groups(model, 0.1), model, t)
    scale = {id(p): (g["use_muon"], g["lr_scale"]) for g in groups for p in g["params"]}
    assert len(scale) == sum(1 for p in model.parameters() if p.requires_grad)
    for name, p in model.named_parameters():
        muon, got = scale[id(p)]
        if name == "lm_head.weight":
            want = t.head_lr / t.lr
        elif name in ("tok_emb.weight", "pos_emb.weight"):
            want = t.embedding_lr / t.lr * decay ** (n + 1)
        elif name.startswith("blocks."):
            i = int(name.split(".")[1])
            want = (t.muon_lr / t.lr if muon else 1.0) * decay ** (n - i)
        else:  # the final norm
            want = 1.0
        assert got == pytest.approx(want), name
    # Off (1.0): the groups of the options without it, unchanged.
    off = load_config(Config, ROOT / "configs" / "tiny-cpu.yaml", flags(small))
    assert len(recipe_groups(param_groups(model, 0.1), model, off.train)) < len(groups)
    with pytest.raises(ScratchError, match="layer_decay must be in"):
        load_config(Config, ROOT / "configs" / "tiny-cpu.yaml",
                    flags(small, "--train.layer_decay=0"))


def test_muon_run_resumes_exactly(small, tmp_path: Path, one_thread) -> None:
    """Every lever on; checkpoint at step 3, run to 6; then resume from step 3: the losses of
    steps 4 to 6 are bitwise those of the run left alone (Muon's momentum and the per-group
    learning rates come back from the checkpoint)."""
    argv = ("--train.max_steps=6", "--train.checkpoint_every=3", "--train.eval_every=0",
            "--train.keep_last=5", "--train.global_batch_tokens=1024")
    make_trainer(small, tmp_path, *argv).run()
    whole = losses(tmp_path)
    saved = load_file(str(tmp_path / "checkpoints" / "step-000003" / "optimizer.safetensors"))
    assert any(k.endswith("::momentum_buffer") for k in saved)
    shutil.rmtree(tmp_path / "checkpoints" / "step-000006")
    shutil.rmtree(tmp_path / "final")
    resumed = make_trainer(small, tmp_path, *argv, resume=True)
    assert resumed.step == 3
    resumed.run()
    assert losses(tmp_path) == whole  # bitwise: floats compared exactly


@pytest.mark.slow
@pytest.mark.distributed
def test_muon_under_every_data_parallel_layout(small, tmp_path: Path) -> None:
    """DDP, ZeRO-1, ZeRO-2/3 (FSDP, DTensor shards) and tensor parallelism on 2 processes
    train as one process does with Muon: the same losses and final weights."""
    from scratchlm.train.pretrain import run_pretraining

    argv = ["pretrain", "--config", str(ROOT / "configs" / "tiny-cpu.yaml"), "--quiet",
            *flags(small), "--train.max_steps=4", "--train.eval_every=0",
            "--train.checkpoint_every=0", "--train.global_batch_tokens=4096"]
    cfg = load_config(Config, ROOT / "configs" / "tiny-cpu.yaml",
                      [a for a in argv if a.startswith("--") and "=" in a])
    run_pretraining(cfg, tmp_path / "single", progress=False)
    layouts = {"ddp": ["--parallel.dp=2"], "zero1": ["--parallel.dp=2", "--parallel.zero=1"],
               "zero2": ["--parallel.dp=2", "--parallel.zero=2"],
               "zero3": ["--parallel.dp=2", "--parallel.zero=3"], "tp": ["--parallel.tp=2"]}
    run_plan([{"argv": argv + f, "out": str(tmp_path / name)} for name, f in layouts.items()],
             tmp_path, procs=2)
    ref = load_file(str(tmp_path / "single" / "final" / "model.safetensors"))
    for name in layouts:
        assert losses(tmp_path / name) == pytest.approx(losses(tmp_path / "single"), abs=1e-5)
        got = load_file(str(tmp_path / name / "final" / "model.safetensors"))
        for key in ref:
            torch.testing.assert_close(got[key], ref[key], atol=5e-4, rtol=1e-3)


# ------------------------------------------------------------------------------------------------
# schedules


def test_wsd_schedule_shape() -> None:
    """Warm-up to the peak, the peak held, then a cool-down over the last decay_fraction to
    lr * min_lr_ratio: a straight line, or half a cosine."""
    kw = dict(max_lr=1.0, warmup_steps=10, total_steps=100, min_lr_ratio=0.1, schedule="wsd",
              decay_fraction=0.2)
    lin = [lr_at(s, **kw, decay_shape="linear") for s in range(101)]
    cos = [lr_at(s, **kw, decay_shape="cosine") for s in range(101)]
    assert lin[0] == pytest.approx(0.1) and lin[9] == pytest.approx(1.0)
    assert all(x == 1.0 for x in lin[10:81])  # stable until 80% of the run
    assert lin[90] == pytest.approx(0.55) and lin[100] == pytest.approx(0.1)
    assert all(a > b for a, b in zip(lin[80:100], lin[81:101]))
    steps = [b - a for a, b in zip(lin[80:100], lin[81:101])]
    assert max(steps) == pytest.approx(min(steps))  # linear: equal steps down
    assert cos[90] == pytest.approx(0.55) and cos[100] == pytest.approx(0.1)
    assert cos[85] > lin[85] and cos[95] < lin[95]  # cosine: slow start, slow finish
    # Past the end (the budget's last steps): the floor.
    assert lr_at(130, **kw) == pytest.approx(0.1)


def test_schedule_follows_the_time_budget_with_a_fake_clock() -> None:
    """On a machine where steps are slow, the run position is the share of the budget spent:
    the same warm-up and cool-down play out within the budget, at any speed."""
    total, budget = 900, 600.0
    warm = warmup_length(0, 0.05, total)  # 5% of the run = 30 s of the budget
    kw = dict(max_lr=1.0, warmup_steps=warm, total_steps=total, min_lr_ratio=0.1,
              schedule="wsd", decay_fraction=0.3)
    # A slow machine: 1 step per 2 s, so the budget ends at step 300 of 900.
    at = lambda step: lr_at(run_position(step, total, 2.0 * step, budget), **kw)  # noqa: E731
    # 20 s in, step 10 stands at 20/600 of the run, position 30: two thirds of the warm-up.
    assert run_position(10, total, 20.0, budget) == pytest.approx(30.0)
    assert at(10) == pytest.approx(31 / 45)
    assert at(100) == 1.0  # a third of the budget: stable
    assert at(300) == pytest.approx(0.1)  # the budget's end: cooled down fully
    assert 0.1 < at(250) < 1.0  # in the cool-down (the last 30% of the budget)
    # A fast machine: steps lead the clock, so the position is the step.
    assert run_position(450, total, 60.0, budget) == 450
    assert run_position(7, total, 1e9, 0.0) == 7  # no budget: steps only


def clocked_run(small, tmp_path: Path, *flags: str,
                progress: bool = False) -> tuple[Trainer, list[dict]]:
    """A run with a fake clock at 10 s a step (max_steps far away, the last half of the run a
    cool-down), and its metrics rows."""
    trainer = make_trainer(small, tmp_path, "--train.optimizer=adamw", "--train.max_steps=1000",
                           "--train.eval_every=0", "--train.decay_fraction=0.5",
                           "--train.checkpoint_every=0", "--train.global_batch_tokens=1024",
                           *flags, progress=progress)
    trainer.clock = lambda: 10.0 * trainer.step
    trainer.run()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    return trainer, rows


def test_trainer_schedule_and_stop_follow_the_clock(small, tmp_path: Path, capsys) -> None:
    """Through the loop, with a fake clock at 10 s per step and a 40 s budget (max_steps far
    away): warm-up and cool-down are shares of the budget, and the run stops at 40 s; the
    progress bar counts the budget's seconds, not the 1,000 steps."""
    trainer, rows = clocked_run(small, tmp_path, "--train.time_budget_s=40",
                                "--train.warmup_fraction=0.25", progress=True)
    lr = trainer.cfg.lr
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    # Positions 0, 250, 500, 750 of 1000: first warm-up step, peak, peak, halfway down.
    assert [r["lr"] for r in rows] == pytest.approx(
        [lr / 250, lr, lr, lr - 0.5 * (lr - lr * trainer.cfg.min_lr_ratio)])
    shown = capsys.readouterr()
    assert "time budget of 40 s reached at step 4" in shown.out
    assert "40/40 s" in shown.err and "step=4" in shown.err and "/1000" not in shown.err


def test_warmup_steps_count_steps_under_the_clock(small, tmp_path: Path) -> None:
    """A warm-up given in steps is not shortened by a slow clock (a 17-step warm-up instead of
    50 cost the former 10-minute recipe 0.3 bits per byte at step 100): three steps of warm-up
    take three steps although the clock puts step 1 at a sixth of the budget; the decay
    still follows the clock."""
    trainer, rows = clocked_run(small, tmp_path, "--train.time_budget_s=60",
                                "--train.warmup_steps=3", "--train.schedule=wsd")
    lr, floor = trainer.cfg.lr, trainer.cfg.lr * trainer.cfg.min_lr_ratio
    # Steps 0-2 warm up (positions 0, 167, 333 of 1000); then positions 500, 667, 833: the
    # cool-down of the last half, from its start.
    assert [r["lr"] for r in rows] == pytest.approx(
        [lr / 3, 2 * lr / 3, lr, lr, lr - (lr - floor) / 3, lr - 2 * (lr - floor) / 3])


# ------------------------------------------------------------------------------------------------
# block variants


def tiny_cfg(**changes) -> ModelConfig:
    return ModelConfig.from_preset("llama-tiny", **changes)


def test_logit_softcap_bounds_the_logits() -> None:
    torch.manual_seed(0)
    plain = GPT(tiny_cfg(init_std=0.5))  # large weights: raw logits far beyond the cap
    capped = GPT(tiny_cfg(init_std=0.5, logit_softcap=5.0))
    capped.load_state_dict(plain.state_dict())
    idx = torch.randint(0, 512, (2, 16))
    raw, _ = plain(idx)
    out, _ = capped(idx)
    assert raw.abs().max() > 5.0 and out.abs().max() < 5.0
    torch.testing.assert_close(out, 5.0 * torch.tanh(raw / 5.0))


def test_zero_init_blocks_start_as_the_identity() -> None:
    torch.manual_seed(0)
    model = GPT(tiny_cfg(zero_init=True, tie_embeddings=False))
    for block in model.blocks.values():
        assert not block.attn.proj.weight.any() and not block.mlp.proj.weight.any()
    assert not model.lm_head.weight.any()
    idx = torch.randint(0, 512, (2, 16))
    logits, hidden = model(idx)
    torch.testing.assert_close(hidden, model.norm_f(model.tok_emb(idx)))
    assert not logits.any()  # uniform first predictions
    # A tied head is the embedding: zero-init leaves it alone.
    tied = GPT(tiny_cfg(zero_init=True, tie_embeddings=True))
    assert tied.lm_head.weight.std() > 0.01


def test_qk_norm_makes_attention_blind_to_the_scale_of_q_and_k() -> None:
    """Each head's q and k are RMS-normalised (no gain): scaling the q and k projections
    leaves the output unchanged, which it does not without QK-norm."""
    idx = torch.randint(0, 512, (2, 16))
    for qk_norm in (True, False):
        torch.manual_seed(0)
        model = GPT(tiny_cfg(qk_norm=qk_norm))
        before, _ = model(idx)
        with torch.no_grad():
            for block in model.blocks.values():
                block.attn.q_proj.weight.mul_(7.0)
                block.attn.k_proj.weight.mul_(3.0)
        after, _ = model(idx)
        same = torch.allclose(before, after, atol=1e-4)
        assert same == qk_norm


def test_relu2_mlp() -> None:
    torch.manual_seed(0)
    model = GPT(tiny_cfg(mlp="relu2"))
    mlp = model.blocks["0"].mlp
    x = torch.randn(2, 5, 64)
    torch.testing.assert_close(mlp(x), mlp.proj(torch.relu(mlp.fc(x)) ** 2))
    assert ModelConfig(mlp="relu2", n_embd=64, n_head=4).intermediate_size == 4 * 64


@pytest.mark.parametrize("attention", ["sdpa", "manual"])
def test_attn_dropout_off_keeps_the_residual_dropout(attention: str) -> None:
    """model.attn_dropout=0 with dropout 0.5: in training the attention weights are not
    dropped (the attention of a block in train mode equals eval mode's), while the residual and
    embedding dropout still are; the Hugging Face export carries both rates."""
    torch.manual_seed(0)
    cfg = tiny_cfg(dropout=0.5, attn_dropout=0.0, attention=attention)
    model = GPT(cfg).train()
    attn = model.blocks["0"].attn

    def attend_of(module):
        return module._attend_manual if attention == "manual" else module._attend_fused

    x = torch.randn(2, 16, 64)
    q, k, v = attn._project(x)
    q, k, v = (t.view(2, 16, -1, attn.head_dim).transpose(1, 2) for t in (q, k, v))
    trained = attend_of(attn)(q, k, v, 0)
    attn.eval()
    torch.testing.assert_close(trained, attend_of(attn)(q, k, v, 0))
    assert attn.resid_drop.p == 0.5 and model.drop.p == 0.5
    # Without it, the same attention in train mode drops weights (the default: dropout).
    dropped = GPT(tiny_cfg(dropout=0.5, attention=attention)).train().blocks["0"].attn
    assert dropped.dropout == 0.5 and dropped.attn_drop.p == 0.5
    assert not torch.allclose(attend_of(dropped)(q, k, v, 0), trained)
    hf = config_to_hf(tiny_cfg(dropout=0.5, attn_dropout=0.0))
    assert hf["attention_dropout"] == 0.0
    with pytest.raises(ScratchError, match="attn_dropout must be in"):
        tiny_cfg(attn_dropout=1.0)


@pytest.mark.parametrize("change", [dict(qk_norm=True), dict(mlp="relu2"),
                                    dict(logit_softcap=15.0)])
def test_hf_export_refuses_what_transformers_cannot_hold(change) -> None:
    with pytest.raises(ScratchError, match="no counterpart in GPT2LMHeadModel or "
                                           "LlamaForCausalLM"):
        family(tiny_cfg(**change))


def test_hf_export_takes_zero_init_and_an_untied_head() -> None:
    """zero_init only changes the starting weights, and Llama has an untied head: both
    export."""
    hf = config_to_hf(tiny_cfg(zero_init=True, tie_embeddings=False))
    assert hf["model_type"] == "llama" and hf["tie_word_embeddings"] is False


def test_all_variants_together_start_uniform_with_finite_gradients() -> None:
    """Soft-cap, QK-norm, ReLU² and zero-init together: the first loss is log(vocab) (the
    zero head) and every gradient is finite."""
    torch.manual_seed(0)
    model = GPT(tiny_cfg(qk_norm=True, mlp="relu2", logit_softcap=15.0, zero_init=True,
                         tie_embeddings=False))
    idx = torch.randint(0, 512, (4, 32))
    logits, _ = model(idx)
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), idx.flatten())
    assert loss.item() == pytest.approx(math.log(512), rel=1e-4)  # the zero head: uniform
    loss.backward()
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())


# ------------------------------------------------------------------------------------------------
# the MFU peak


def test_peak_is_the_best_cached_rate_and_says_how(tmp_path: Path, monkeypatch) -> None:
    """The peak is the best rate over the model's matmul shapes (and a square one), each
    timed once per machine and cached with how it was measured: a second run times only
    shapes it has not seen."""
    from scratchlm.train import metrics

    monkeypatch.setenv("SCRATCHLM_CACHE", str(tmp_path))
    timed: list[tuple] = []

    def fake(device, dtype, shape, *a, **k):
        timed.append(shape)
        return 1e9 * shape[2]  # the widest product is the fastest

    monkeypatch.setattr(metrics, "measure_matmul", fake)
    metrics._measured_peak.cache_clear()
    cfg = ModelConfig.from_preset("llama-tiny")
    first = metrics.measured_peak("cpu", torch.float32, metrics.matmul_shapes(cfg, 256))
    assert first["flops"] == 1e9 * 1024  # the 1024^3 square beats the head's 512 columns
    assert "best of 5 x 0.2 s" in first["how"] and str(tmp_path) in first["how"]
    cached = json.loads((tmp_path / "peak_flops.json").read_text())
    assert len(next(iter(cached.values()))["shapes"]) == len(timed)
    n = len(timed)
    metrics._measured_peak.cache_clear()
    again = metrics.measured_peak("cpu", torch.float32, metrics.matmul_shapes(cfg, 256))
    assert again == first and len(timed) == n  # nothing timed again
    metrics._measured_peak.cache_clear()
    wider = metrics.measured_peak("cpu", torch.float32, [(256, 64, 4096)])
    assert timed[n:] == [(256, 64, 4096)] and wider["flops"] == 1e9 * 4096
    metrics._measured_peak.cache_clear()
