"""LoRA: exactness of merge/unmerge, what trains, saving adapters alone, peft agreement,
classification and the memory estimator."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers

from scratchlm.config import LoRAConfig
from scratchlm.model import GPT, ModelConfig
from scratchlm.model.lora import (
    apply_lora,
    bake,
    lora_layers,
    merge,
    save_adapter,
    save_peft,
    unmerge,
)

transformers.logging.set_verbosity_error()


def trained_lora(preset: str, targets: list[str], **kw) -> GPT:
    """A model with adapters whose B is not zero (as after training)."""
    torch.manual_seed(0)
    model = GPT(ModelConfig.from_preset(preset, **kw)).eval()
    apply_lora(model, LoRAConfig(rank=4, alpha=8, targets=targets))
    with torch.no_grad():
        for lora in lora_layers(model).values():
            lora.b.normal_(std=0.05)
    return model


@pytest.mark.parametrize("preset, targets", [("gpt2-tiny", ["attn", "mlp"]),
                                             ("llama-tiny", ["q", "v", "mlp", "head"])])
def test_merge_and_unmerge_keep_the_outputs(preset: str, targets: list[str]) -> None:
    model = trained_lora(preset, targets)
    idx = torch.randint(0, 512, (2, 24))
    with torch.no_grad():
        plain = model(idx)[0]
        merged = merge(model)(idx)[0]
        again = unmerge(model)(idx)[0]
    assert (merged - plain).abs().max() <= 1e-5 and (again - plain).abs().max() <= 1e-5
    assert all(not lora.merged for lora in lora_layers(model).values())
    base = GPT(model.config)
    base.load_state_dict({k: v for k, v in model.state_dict().items() if ".lora." not in k})
    with torch.no_grad():  # B != 0: the adapters do change the model
        assert (base.eval()(idx)[0] - plain).abs().max() > 1e-3


def test_a_fresh_adapter_starts_as_the_base_model() -> None:
    torch.manual_seed(0)
    model = GPT(ModelConfig.from_preset("llama-tiny")).eval()
    idx = torch.randint(0, 512, (2, 16))
    before = model(idx)[0]
    apply_lora(model, LoRAConfig(rank=8))
    assert torch.equal(model(idx)[0], before)  # B starts at zero
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora." in n for n in trainable)


def test_adapters_save_alone_and_load_on_the_base(tmp_path: Path) -> None:
    from scratchlm.model.checkpoint import load_model, save_model

    model = trained_lora("llama-tiny", ["attn"])
    save_model(model, tmp_path)
    adapter = (tmp_path / "adapter.safetensors").stat().st_size
    assert adapter < (tmp_path / "model.safetensors").stat().st_size / 5
    loaded = load_model(tmp_path).eval()
    idx = torch.randint(0, 512, (2, 16))
    with torch.no_grad():
        assert torch.allclose(loaded(idx)[0], model(idx)[0], atol=1e-6)
        baked = bake(loaded)(idx)[0]
    assert not lora_layers(loaded) and torch.allclose(baked, model(idx)[0], atol=1e-5)
    save_adapter(model, tmp_path / "only")
    assert json.loads((tmp_path / "only" / "adapter.json").read_text())["rank"] == 4


def test_peft_on_our_hf_export_gives_the_same_logits(tmp_path: Path) -> None:
    """`PeftModel.from_pretrained(base, adapter)` on our Hugging Face export of the base and
    our peft export of the adapters gives our logits."""
    import peft

    from scratchlm.model.hf import save_hf

    model = trained_lora("llama-tiny", ["attn", "mlp", "head"])
    save_hf(model, tmp_path / "base")
    save_peft(model, tmp_path / "adapter")
    base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    wrapped = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    idx = torch.randint(0, 512, (2, 20))
    with torch.no_grad():
        assert (wrapped(idx).logits - model(idx)[0]).abs().max() <= 1e-4


def test_memory_estimator_knows_lora(capsys) -> None:
    from scratchlm.cli import main
    from scratchlm.memory import count_params, estimate_memory, lora_params

    cfg = ModelConfig.from_preset("llama-tiny")
    model = GPT(cfg)
    apply_lora(model, LoRAConfig(rank=8, targets=["attn", "mlp"]))
    adapters = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert lora_params(cfg, 8, ["attn", "mlp"]) == adapters
    full = estimate_memory(cfg, "fp32")
    lora = estimate_memory(cfg, "fp32", lora_rank=8, lora_targets=["attn", "mlp"])
    assert lora.gradients == 4 * adapters and lora.optimizer == 8 * adapters
    assert lora.weights == 4 * (count_params(cfg) + adapters) and full.optimizer > lora.optimizer
    assert main(["memory", "--preset", "llama-7b", "--lora-rank", "8", "--seq", "512"]) == 0
    out = capsys.readouterr().out
    assert "LoRA rank 8" in out and "trainable" in out


def grown_with_token_rows(tie: bool) -> tuple[GPT, GPT, list[int]]:
    """(the base, the base grown by four tokens with LoRA and the tokens' rows attached,
    the new ids): a LoRA SFT model with a template's tokens, before training."""
    from scratchlm.model.lora import train_token_rows
    from scratchlm.model.resize import grow

    torch.manual_seed(0)
    base = GPT(ModelConfig.from_preset("llama-tiny", tie_embeddings=tie))
    V = base.config.vocab_size
    model = grow(base, V + 4)
    apply_lora(model, LoRAConfig(rank=4, alpha=8, targets=["attn", "mlp", *([] if tie else
                                                                             ["head"])]))
    ids = list(range(V, V + 4))
    train_token_rows(model, ids)
    return base, model, ids


@pytest.mark.parametrize("tie", [True, False])
def test_added_tokens_rows_train_and_load_with_the_adapters(tie: bool, tmp_path: Path) -> None:
    """The rows of tokens added for a template train beside the adapters (their own AdamW
    state, nothing for the base vocabulary), the old rows stay bitwise frozen, and the rows
    save with the adapters and come back on the base (grown to their vocabulary)."""
    from scratchlm.model.checkpoint import load_model, save_model
    from scratchlm.model.lora import load_adapter

    base, model, ids = grown_with_token_rows(tie)
    V, n = base.config.vocab_size, len(ids)
    emb0, head0 = model.tok_emb.weight.clone(), model.lm_head.weight.clone()
    idx = torch.randint(0, V + n, (4, 24))
    idx[:, ::5] = torch.tensor(ids).repeat(4, 5)[:, :idx[:, ::5].size(1)]
    with torch.no_grad():
        start = model.eval()(idx)[0]
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert {"token_rows.emb", *([] if tie else ["token_rows.head"])} == \
        {name for name in trainable if ".lora." not in name}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2,
                            weight_decay=0.1)
    model.train()
    for _ in range(3):
        logits = model(idx[:, :-1])[0]
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), idx[:, 1:].flatten()).backward()
        opt.step()
        opt.zero_grad()
    held = sum(s["exp_avg"].numel() for s in opt.state.values())  # AdamW's state: no more
    assert held == sum(lora.a.numel() + lora.b.numel() for lora in lora_layers(model).values()) \
        + (1 if tie else 2) * n * model.config.n_embd
    rows = model.token_rows
    assert not torch.equal(rows.emb, emb0[V:]) and (tie or not torch.equal(rows.head, head0[V:]))
    assert torch.equal(model.tok_emb.weight, emb0) and torch.equal(model.lm_head.weight, head0)
    model.eval()
    with torch.no_grad():
        trained = model(idx)[0]
        assert (trained - start)[..., V:].abs().max() > 1e-3  # the new tokens' logits moved
        save_model(model, tmp_path / "run")
        assert torch.equal(load_model(tmp_path / "run").eval()(idx)[0], trained)
        onto = load_adapter(base, tmp_path / "run").eval()  # the adapter on its first base
        assert onto.config.vocab_size == V + n and torch.equal(onto(idx)[0], trained)
        assert (bake(onto)(idx)[0] - trained).abs().max() <= 1e-5
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "run" / "adapter.safetensors"))
    assert torch.equal(saved["token_rows.emb"], rows.emb)
    assert torch.equal(load_file(str(tmp_path / "run" / "model.safetensors"))["tok_emb.weight"],
                       emb0)  # the base saves as it was: its new rows still the initial mean


@pytest.mark.parametrize("tie", [True, False])
def test_peft_on_our_hf_export_carries_the_added_tokens_rows(tie: bool, tmp_path: Path) -> None:
    """The Hugging Face export of a LoRA model with trained rows for added tokens holds those
    rows in its base, so peft's adapters on it give our logits."""
    import peft

    from scratchlm.model.hf import save_hf

    _, model, ids = grown_with_token_rows(tie)
    with torch.no_grad():
        for lora in lora_layers(model).values():
            lora.b.normal_(std=0.05)
        model.token_rows.emb.normal_(std=0.1)
        if not tie:
            model.token_rows.head.normal_(std=0.1)
    save_hf(model, tmp_path / "base")
    save_peft(model, tmp_path / "adapter")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    wrapped = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    idx = torch.randint(0, model.config.vocab_size, (2, 20))
    idx[:, ::4] = ids[0]
    with torch.no_grad():
        assert (wrapped(idx).logits - model.eval()(idx)[0]).abs().max() <= 1e-4
