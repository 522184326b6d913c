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
