"""The training loop: behaviour on real text, accumulation, precisions, checkpoints, resume."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from scratchlm.config import Config, load_config
from scratchlm.data.prepare import tokenizer_fingerprint
from scratchlm.errors import ScratchError
from scratchlm.tokenizer import BPETokenizer
from scratchlm.train import checkpoint as ckpt
from scratchlm.train.optim import param_groups
from scratchlm.train.pretrain import PretrainObjective, build_model, run_pretraining
from scratchlm.train.schedule import lr_at
from scratchlm.train.trainer import Trainer

from helpers import sigkill_then_resume, snapshot

ROOT = Path(__file__).resolve().parents[1]


def tiny(prepared, *overrides: str) -> Config:
    tok_dir, data_dir = prepared
    return load_config(Config, ROOT / "configs" / "tiny-cpu.yaml",
                       [f"--tokenizer.path={tok_dir}", f"--data.shards={data_dir}",
                        *overrides])


def make_trainer(prepared, out: Path, *overrides: str, resume: bool = False,
                 objective_class: type = PretrainObjective, freeze: str | None = None
                 ) -> Trainer:
    """The pretraining loop on the tiny-cpu recipe, through the public API: a model, an
    objective and the loop (`freeze` names a parameter to freeze first)."""
    cfg = tiny(prepared, *overrides)
    tok = BPETokenizer.load(prepared[0])
    model, cfg = build_model(cfg, tok)
    if freeze:
        model.get_parameter(freeze).requires_grad_(False)
    objective = objective_class(prepared[1], tok, tokenizer_fingerprint(prepared[0]),
                                cfg.model.block_size, cfg.model.vocab_size,
                                cfg.train.eval_batches, cfg.train.sample_tokens)
    return Trainer(cfg.train, cfg.parallel, model, objective, out, cfg, tok, resume,
                   progress=False)


# ------------------------------------------------------------------------------------------------
# pieces


def test_lr_schedule() -> None:
    lrs = [lr_at(s, 1.0, 10, 100, 0.1) for s in range(120)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert lrs[10] == pytest.approx(1.0) and lrs[55] == pytest.approx(0.55)
    assert lrs[100] == pytest.approx(0.1) and lrs[119] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))


def test_weight_decay_only_on_matrices(prepared) -> None:
    from scratchlm.model import GPT, ModelConfig

    for kw in [{}, {"tie_embeddings": False, "pos_emb": "learned", "bias": True}]:
        model = GPT(ModelConfig.from_preset("llama-tiny", **kw))
        decay, no_decay = param_groups(model, 0.1)
        names = {id(p): n for n, p in model.named_parameters()}
        decayed = {names[id(p)] for p in decay["params"]}
        assert decayed == {n for n, p in model.named_parameters()
                           if p.dim() == 2 and "emb" not in n}
        assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
        assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


# ------------------------------------------------------------------------------------------------
# behaviour


def test_loss_falls_and_run_writes_its_files(prepared, tmp_path: Path) -> None:
    cfg = tiny(prepared)
    summary = run_pretraining(cfg, tmp_path, progress=False)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 60 and rows[0]["loss"] > 7.0
    assert summary["val"]["loss"] < rows[0]["loss"] - 0.8  # real learning on real text
    evals = [r for r in rows if "val_loss" in r]
    assert [r["step"] for r in evals] == [30, 60] and evals[1]["val_bpb"] < evals[0]["val_bpb"]
    assert all(r["tokens_per_s"] > 0 and 0 < r["mfu"] < 1 and r["grad_norm"] > 0 for r in rows)
    assert (tmp_path / "loss.png").stat().st_size > 5000
    assert (tmp_path / "metrics.csv").read_text().count("\n") == 61
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        "step-000030", "step-000060"]
    from scratchlm.model.checkpoint import load_model

    final = load_model(tmp_path / "final")
    assert all((tmp_path / "final" / f).is_file() for f in ("bpe.json", "run.yaml"))
    assert final.config.vocab_size == 2048
    with pytest.raises(ScratchError, match="already holds a run; pass --resume"):
        run_pretraining(cfg, tmp_path, progress=False)


def test_trainable_parameters_change_frozen_ones_do_not(prepared, tmp_path: Path) -> None:
    trainer = make_trainer(prepared, tmp_path, freeze="blocks.0.attn.q_proj.weight")
    frozen = trainer.model.blocks["0"].attn.q_proj.weight
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    for _ in range(3):
        trainer.train_step()
    for n, p in trainer.model.named_parameters():
        if p is frozen:
            assert torch.equal(p, before[n]), n
        else:
            assert not torch.equal(p, before[n]), n


def test_accumulation_4x1_equals_1x4(prepared, tmp_path: Path) -> None:
    """Four micro-batches of 1 sequence and one of 4 see the same 4 windows and must give the
    same gradients (up to float summation order)."""
    grads = []
    for micro in (1, 4):
        trainer = make_trainer(prepared, tmp_path / str(micro), f"--train.micro_batch={micro}",
                               "--train.global_batch_tokens=512", "--train.grad_clip=0")
        assert trainer.accumulation == 4 // micro
        trainer.compute_gradients()
        grads.append({n: p.grad.clone() for n, p in trainer.model.named_parameters()})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-7, rtol=1e-4)


def test_global_batch_must_divide(prepared, tmp_path: Path) -> None:
    with pytest.raises(ScratchError, match="must be a multiple of micro_batch x block_size"):
        make_trainer(prepared, tmp_path, "--train.global_batch_tokens=1000")


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_stays_close_to_fp32(prepared, tmp_path: Path, precision: str) -> None:
    losses = {}
    for p in ("fp32", precision):
        trainer = make_trainer(prepared, tmp_path / p, f"--train.precision={p}")
        assert trainer.precision == p
        for _ in range(15):
            row = trainer.train_step()
            trainer.step += 1
        losses[p] = row["loss"]
        for param in trainer.model.parameters():  # master weights stay fp32
            assert param.dtype == torch.float32
    assert abs(losses[precision] - losses["fp32"]) < 0.05, losses


def test_non_finite_steps_are_skipped_then_stop_the_run(prepared, tmp_path: Path) -> None:
    class Poisoned(PretrainObjective):
        """A loss that turns NaN from the 9th micro-batch (step 5) on."""

        calls = 0

        def loss(self, model, extras, batch):
            Poisoned.calls += 1
            loss, count = super().loss(model, extras, batch)
            return (loss * float("nan") if Poisoned.calls > 8 else loss), count

    trainer = make_trainer(prepared, tmp_path, "--train.max_bad_steps=3",
                           "--train.checkpoint_every=2", "--train.eval_every=0",
                           objective_class=Poisoned)
    with pytest.raises(ScratchError, match="not finite for 3 steps in a row.*step-000004"):
        trainer.run()
    assert trainer.skipped == 3
    state = json.loads((tmp_path / "checkpoints" / "step-000004" / "trainer_state.json"
                        ).read_text())
    assert state["step"] == 4


# ------------------------------------------------------------------------------------------------
# checkpoints and resume


def test_resume_falls_back_past_a_damaged_checkpoint(prepared, tmp_path: Path, capsys) -> None:
    trainer = make_trainer(prepared, tmp_path, "--train.max_steps=6", "--train.eval_every=0",
                           "--train.checkpoint_every=2", "--train.keep_last=5")
    trainer.run()
    (tmp_path / "checkpoints" / "step-000006" / "model.safetensors").write_bytes(b"junk")
    resumed = make_trainer(prepared, tmp_path, "--train.max_steps=6", "--train.eval_every=0",
                           "--train.checkpoint_every=2", resume=True)
    out = capsys.readouterr().out
    assert "cannot resume from step-000006" in out and "damaged checkpoint" in out
    assert resumed.step == 4


def test_checkpoint_of_another_model_is_refused(prepared, tmp_path: Path) -> None:
    """Resuming with another model shape refuses, naming what differs, and changes nothing."""
    make_trainer(prepared, tmp_path, "--train.max_steps=2", "--train.eval_every=0").run()
    before = snapshot(tmp_path)
    with pytest.raises(ScratchError, match=r"no checkpoint loads .*another model \(n_embd 64 "
                                           r"vs 32.*nothing was changed"):
        make_trainer(prepared, tmp_path, "--model.n_embd=32", resume=True)
    assert snapshot(tmp_path) == before


class ScriptedValidation(PretrainObjective):
    """Pretraining whose validation losses follow a script: lowest at the third evaluation."""

    LOSSES = [5.0, 4.0, 1.0, 3.0, 2.0, 6.0]

    def evaluate(self, runtime) -> dict[str, float]:
        self.evals = getattr(self, "evals", 0) + 1
        return {"loss": self.LOSSES[self.evals - 1], "evaluation": float(self.evals)}


@pytest.mark.parametrize("keep_best", [False, True])
def test_keep_best_ends_with_the_best_evaluations_weights(prepared, tmp_path: Path,
                                                          keep_best: bool) -> None:
    """train.keep_best: final/ holds the weights of the evaluation with the lowest validation
    loss (step 15 of 30 here), the summary its metrics; off, the last step's."""
    from safetensors.torch import load_file

    trainer = make_trainer(prepared, tmp_path, "--train.max_steps=30", "--train.eval_every=5",
                           "--train.checkpoint_every=0", "--train.keep_last=1",
                           f"--train.keep_best={str(keep_best).lower()}",
                           objective_class=ScriptedValidation)
    summary = trainer.run()
    final = load_file(str(tmp_path / "final" / "model.safetensors"))
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    kept = "step-000015" if keep_best else "step-000030"
    assert names == (["step-000015", "step-000030"] if keep_best else ["step-000030"])
    saved = load_file(str(tmp_path / "checkpoints" / kept / "model.safetensors"))
    assert final.keys() == saved.keys() and all(torch.equal(final[k], saved[k]) for k in final)
    if keep_best:  # the weights did move after step 15
        last = load_file(str(tmp_path / "checkpoints" / "step-000030" / "model.safetensors"))
        assert not all(torch.equal(final[k], last[k]) for k in final)
    assert summary["best_step"] == 15 and summary["best_val_loss"] == 1.0
    assert summary["val"]["evaluation"] == (3.0 if keep_best else 6.0)
    assert summary["final_step"] == (15 if keep_best else 30)


@pytest.mark.slow
def test_sigkill_then_resume_equals_uninterrupted_run(prepared, tmp_path: Path) -> None:
    """Kill a run with SIGKILL mid-way, resume it: the final weights are bitwise those of the
    same run left alone (CPU, fp32, dropout off)."""
    tok_dir, data_dir = prepared
    argv = ["pretrain", "--config", "tiny-cpu", "--quiet", f"--tokenizer.path={tok_dir}",
            f"--data.shards={data_dir}", "--train.max_steps=40", "--train.checkpoint_every=10",
            "--train.global_batch_tokens=8192"]
    whole, killed = sigkill_then_resume(argv, tmp_path, 20, ["model.safetensors"])
    whole = json.loads((whole / "summary.json").read_text())
    killed = json.loads((killed / "summary.json").read_text())
    assert whole["val"]["loss"] == killed["val"]["loss"]
    assert math.isfinite(whole["val"]["loss"])


def test_compile_without_a_cpu_compiler_is_refused_in_one_line(prepared, tmp_path: Path,
                                                                monkeypatch) -> None:
    """Inductor would fail at the first step with a long trace; the loop refuses up front,
    before the run directory is made."""
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))  # a machine with no g++ on its PATH
    with pytest.raises(ScratchError, match=r"needs a C\+\+ compiler \(g\+\+, .*"
                                           r"or set train.compile=false"):
        make_trainer(prepared, tmp_path / "run", "--train.compile=true")
    assert not (tmp_path / "run").exists()
    make_trainer(prepared, tmp_path / "eager", "--train.compile=false")  # eager needs none


def test_list_checkpoints_ignores_incomplete(tmp_path: Path) -> None:
    (tmp_path / "checkpoints" / ".step-000010.tmp").mkdir(parents=True)
    (tmp_path / "checkpoints" / "step-000005").mkdir()
    assert ckpt.list_checkpoints(tmp_path) == []


@pytest.mark.slow
def test_torch_compile_trains_like_eager(prepared, tmp_path: Path) -> None:
    """`train.compile` (inductor, which builds C++ kernels on the CPU) gives eager's losses."""
    losses = {}
    for flag in ("false", "true"):
        trainer = make_trainer(prepared, tmp_path / flag, f"--train.compile={flag}")
        losses[flag] = [trainer.train_step()["loss"] for _ in range(3)]
    assert losses["true"] == pytest.approx(losses["false"], abs=1e-4)
