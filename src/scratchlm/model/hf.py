"""Weights in and out of Hugging Face `transformers`: GPT2LMHeadModel and LlamaForCausalLM.

Two maps, one per family, between their tensor names and ours. GPT-2 stores its linear layers
as Conv1D, (in, out), so those are transposed, and fuses q, k, v into one `c_attn`, which is
split into our three projections; Llama's tensors map one to one. Reading a directory needs
only safetensors (or a weights-only torch file); `to_hf` needs `transformers` itself.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from scratchlm.errors import ScratchError
from scratchlm.model.checkpoint import base_tensors, check_state
from scratchlm.model.config import ModelConfig
from scratchlm.model.gpt import GPT
from scratchlm.utils import atomic_write_text, save_tensors

# GPT-2's activation_function names of Hugging Face -> our mlp: its tanh GELU by two names, the
# exact (erf) one as "gelu". Export writes the first name of each.
GPT2_GELU = {"gelu_new": "gelu", "gelu_pytorch_tanh": "gelu", "gelu": "gelu_exact"}

# ------------------------------------------------------------------------------------------------
# configs


def config_from_hf(hf: dict) -> ModelConfig:
    """Our ModelConfig from a Hugging Face config.json dict."""
    kind = hf.get("model_type")
    if kind == "gpt2":
        act = hf.get("activation_function", "gelu_new")
        if act not in GPT2_GELU:
            raise ScratchError(f"GPT-2 config: activation_function {act!r} is not supported "
                               f"(only GELU: {', '.join(sorted(GPT2_GELU))})")
        if hf.get("scale_attn_by_inverse_layer_idx") or hf.get("reorder_and_upcast_attn"):
            raise ScratchError("GPT-2 config: scale_attn_by_inverse_layer_idx and "
                               "reorder_and_upcast_attn are not supported")
        return ModelConfig(
            vocab_size=hf["vocab_size"], block_size=hf.get("n_positions", 1024),
            n_layer=hf["n_layer"], n_head=hf["n_head"], n_embd=hf["n_embd"],
            intermediate_size=hf.get("n_inner") or 4 * hf["n_embd"], pos_emb="learned",
            norm="layernorm", norm_eps=hf.get("layer_norm_epsilon", 1e-5), mlp=GPT2_GELU[act],
            bias=True, tie_embeddings=hf.get("tie_word_embeddings", True),
            dropout=0.0)
    if kind == "llama":
        if hf.get("hidden_act", "silu") != "silu":
            raise ScratchError(f"Llama config: hidden_act {hf['hidden_act']!r} is not supported")
        if bool(hf.get("attention_bias", False)) != bool(hf.get("mlp_bias", False)):
            raise ScratchError("Llama config: attention_bias and mlp_bias must agree")
        # transformers 5 keeps RoPE settings in rope_parameters; 4.x in rope_theta/rope_scaling.
        rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
        theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
        kind_rope = rope.get("rope_type", rope.get("type", "default"))
        scaling = None
        if kind_rope == "llama3":
            scaling = {k: float(rope[k]) for k in ("factor", "low_freq_factor",
                                                   "high_freq_factor",
                                                   "original_max_position_embeddings")}
        elif kind_rope != "default":
            raise ScratchError(f"Llama config: rope type {kind_rope!r} is not supported "
                               "(default and llama3 are)")
        n_head = hf["num_attention_heads"]
        return ModelConfig(
            vocab_size=hf["vocab_size"], block_size=hf.get("max_position_embeddings", 2048),
            n_layer=hf["num_hidden_layers"], n_head=n_head,
            n_kv_head=hf.get("num_key_value_heads") or n_head, n_embd=hf["hidden_size"],
            head_dim=hf.get("head_dim") or hf["hidden_size"] // n_head,
            intermediate_size=hf["intermediate_size"], pos_emb="rope", rope_theta=float(theta),
            rope_scaling=scaling, norm="rmsnorm", norm_eps=hf.get("rms_norm_eps", 1e-6),
            mlp="swiglu", bias=bool(hf.get("attention_bias", False)),
            tie_embeddings=hf.get("tie_word_embeddings", False), dropout=0.0)
    raise ScratchError(f"Hugging Face model_type {kind!r} is not supported; "
                       "scratchlm converts 'gpt2' and 'llama'")


def family(cfg: ModelConfig) -> str:
    """'gpt2' or 'llama': which Hugging Face architecture can hold this model exactly."""
    beyond = [name for name, on in [("qk_norm", cfg.qk_norm), ("mlp relu2", cfg.mlp == "relu2"),
                                    ("logit_softcap", cfg.logit_softcap)] if on]
    if beyond:
        raise ScratchError(f"model.{beyond[0].replace(' ', '=')} has no counterpart in "
                           "GPT2LMHeadModel or LlamaForCausalLM, so this model cannot be "
                           "converted to transformers; train without it to export")
    gpt2 = dict(pos_emb="learned", norm="layernorm", bias=True, tie_embeddings=True)
    llama = dict(pos_emb="rope", norm="rmsnorm", mlp="swiglu")
    if all(getattr(cfg, k) == v for k, v in gpt2.items()) and cfg.mlp in GPT2_GELU.values() \
            and cfg.n_kv_head == cfg.n_head \
            and cfg.head_dim * cfg.n_head == cfg.n_embd:
        return "gpt2"
    if all(getattr(cfg, k) == v for k, v in llama.items()):
        return "llama"
    raise ScratchError("this model mixes GPT-2 and Llama parts (positions, norm, MLP, bias), "
                       "so neither GPT2LMHeadModel nor LlamaForCausalLM can hold it")


def config_to_hf(cfg: ModelConfig) -> dict:
    """A Hugging Face config.json dict for this model."""
    if family(cfg) == "gpt2":
        return {
            "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"],
            "vocab_size": cfg.vocab_size, "n_positions": cfg.block_size, "n_ctx": cfg.block_size,
            "n_embd": cfg.n_embd, "n_layer": cfg.n_layer, "n_head": cfg.n_head,
            "n_inner": cfg.intermediate_size,
            "activation_function": next(k for k, v in GPT2_GELU.items() if v == cfg.mlp),
            "layer_norm_epsilon": cfg.norm_eps, "resid_pdrop": cfg.dropout,
            "embd_pdrop": cfg.dropout, "attn_pdrop": cfg.attention_dropout,
            "tie_word_embeddings": True,
            # GPT2Config defaults both to 50256, wrong for any other vocabulary; save_hf sets
            # them from the tokenizer.
            "bos_token_id": None, "eos_token_id": None,
        }
    out = {
        "model_type": "llama", "architectures": ["LlamaForCausalLM"],
        "vocab_size": cfg.vocab_size, "max_position_embeddings": cfg.block_size,
        "hidden_size": cfg.n_embd, "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.n_layer, "num_attention_heads": cfg.n_head,
        "num_key_value_heads": cfg.n_kv_head, "head_dim": cfg.head_dim,
        "rms_norm_eps": cfg.norm_eps, "hidden_act": "silu", "rope_theta": cfg.rope_theta,
        "attention_bias": cfg.bias, "mlp_bias": cfg.bias,
        "tie_word_embeddings": cfg.tie_embeddings, "attention_dropout": cfg.attention_dropout,
    }
    if cfg.rope_scaling:
        out["rope_scaling"] = {"rope_type": "llama3", **cfg.rope_scaling}
    return out


# ------------------------------------------------------------------------------------------------
# tensors


# Per GPT-2 block: (our module, Hugging Face's module, stored as Conv1D (in, out)?).
_GPT2_LAYER = [("norm1", "ln_1", False), ("norm2", "ln_2", False),
               ("attn.proj", "attn.c_proj", True),
               ("mlp.fc", "mlp.c_fc", True), ("mlp.proj", "mlp.c_proj", True)]


def state_from_hf(cfg: ModelConfig, hf: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Hugging Face tensor names and layouts -> ours."""
    def take(name: str) -> torch.Tensor:
        if name not in hf:
            raise ScratchError(f"Hugging Face weights lack tensor {name!r}; the files are "
                               "incomplete or from another architecture")
        return hf[name]

    out: dict[str, torch.Tensor] = {}
    if family(cfg) == "gpt2":
        out["tok_emb.weight"] = take("transformer.wte.weight")
        out["pos_emb.weight"] = take("transformer.wpe.weight")
        for i in range(cfg.n_layer):
            h, o = f"transformer.h.{i}.", f"blocks.{i}."
            for ours, theirs, transpose in _GPT2_LAYER:
                w = take(h + theirs + ".weight")
                out[o + ours + ".weight"] = w.t() if transpose else w  # Conv1D is (in, out)
                out[o + ours + ".bias"] = take(h + theirs + ".bias")
            # GPT-2 keeps q, k and v in one Conv1D: split it into our three projections.
            w = take(h + "attn.c_attn.weight").t().chunk(3, dim=0)
            b = take(h + "attn.c_attn.bias").chunk(3, dim=0)
            for j, p in enumerate("qkv"):
                out[f"{o}attn.{p}_proj.weight"], out[f"{o}attn.{p}_proj.bias"] = w[j], b[j]
        out["norm_f.weight"] = take("transformer.ln_f.weight")
        out["norm_f.bias"] = take("transformer.ln_f.bias")
        return {k: v.contiguous() for k, v in out.items()}
    out["tok_emb.weight"] = take("model.embed_tokens.weight")
    for i in range(cfg.n_layer):
        h, o = f"model.layers.{i}.", f"blocks.{i}."
        out[o + "norm1.weight"] = take(h + "input_layernorm.weight")
        out[o + "norm2.weight"] = take(h + "post_attention_layernorm.weight")
        for suffix in (["weight", "bias"] if cfg.bias else ["weight"]):
            for p in "qkv":
                out[f"{o}attn.{p}_proj.{suffix}"] = take(f"{h}self_attn.{p}_proj.{suffix}")
            out[f"{o}attn.proj.{suffix}"] = take(f"{h}self_attn.o_proj.{suffix}")
            out[f"{o}mlp.gate.{suffix}"] = take(f"{h}mlp.gate_proj.{suffix}")
            out[f"{o}mlp.up.{suffix}"] = take(f"{h}mlp.up_proj.{suffix}")
            out[f"{o}mlp.proj.{suffix}"] = take(f"{h}mlp.down_proj.{suffix}")
    out["norm_f.weight"] = take("model.norm.weight")
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = take("lm_head.weight")
    return out


_LLAMA_LINEAR = {"attn.q_proj": "self_attn.q_proj", "attn.k_proj": "self_attn.k_proj",
                 "attn.v_proj": "self_attn.v_proj", "attn.proj": "self_attn.o_proj",
                 "mlp.gate": "mlp.gate_proj", "mlp.up": "mlp.up_proj", "mlp.proj": "mlp.down_proj"}


def hf_linear_name(cfg: ModelConfig, name: str) -> str:
    """A Llama-family linear layer's module path in LlamaForCausalLM ("blocks.3.attn.proj" ->
    "model.layers.3.self_attn.o_proj")."""
    if name == "lm_head":
        return name
    _, layer, rest = name.split(".", 2)
    return f"model.layers.{layer}.{_LLAMA_LINEAR[rest]}"


def state_to_hf(model: GPT) -> dict[str, torch.Tensor]:
    """Our tensors -> Hugging Face names and layouts (a tied head left out, as HF saves it;
    LoRA adapters left out, see `lora.save_peft`)."""
    from scratchlm.model.lora import base_rows

    # Rows trained for added tokens beside LoRA adapters go into the exported base: peft's
    # adapters then add to the same weights ours do.
    cfg, ours = model.config, base_rows(model, base_tensors(model))
    out: dict[str, torch.Tensor] = {}
    if family(cfg) == "gpt2":
        out["transformer.wte.weight"] = ours["tok_emb.weight"]
        out["transformer.wpe.weight"] = ours["pos_emb.weight"]
        for i in range(cfg.n_layer):
            h, o = f"transformer.h.{i}.", f"blocks.{i}."
            for mine, theirs, transpose in _GPT2_LAYER:
                w = ours[o + mine + ".weight"]
                out[h + theirs + ".weight"] = w.t() if transpose else w
                out[h + theirs + ".bias"] = ours[o + mine + ".bias"]
            out[h + "attn.c_attn.weight"] = torch.cat(
                [ours[f"{o}attn.{p}_proj.weight"] for p in "qkv"], dim=0).t()
            out[h + "attn.c_attn.bias"] = torch.cat(
                [ours[f"{o}attn.{p}_proj.bias"] for p in "qkv"], dim=0)
        out["transformer.ln_f.weight"] = ours["norm_f.weight"]
        out["transformer.ln_f.bias"] = ours["norm_f.bias"]
    else:
        out["model.embed_tokens.weight"] = ours["tok_emb.weight"]
        for i in range(cfg.n_layer):
            h, o = f"model.layers.{i}.", f"blocks.{i}."
            out[h + "input_layernorm.weight"] = ours[o + "norm1.weight"]
            out[h + "post_attention_layernorm.weight"] = ours[o + "norm2.weight"]
            for suffix in (["weight", "bias"] if cfg.bias else ["weight"]):
                for p in "qkv":
                    out[f"{h}self_attn.{p}_proj.{suffix}"] = ours[f"{o}attn.{p}_proj.{suffix}"]
                out[f"{h}self_attn.o_proj.{suffix}"] = ours[f"{o}attn.proj.{suffix}"]
                out[f"{h}mlp.gate_proj.{suffix}"] = ours[f"{o}mlp.gate.{suffix}"]
                out[f"{h}mlp.up_proj.{suffix}"] = ours[f"{o}mlp.up.{suffix}"]
                out[f"{h}mlp.down_proj.{suffix}"] = ours[f"{o}mlp.proj.{suffix}"]
        out["model.norm.weight"] = ours["norm_f.weight"]
        if not cfg.tie_embeddings:
            out["lm_head.weight"] = ours["lm_head.weight"]
    return {k: v.detach().contiguous() for k, v in out.items()}


# ------------------------------------------------------------------------------------------------
# models and directories


def _read_hf_config(directory: Path) -> dict:
    cfg_path = directory / "config.json"
    if not cfg_path.is_file():
        raise ScratchError(f"{directory}: no config.json; not a Hugging Face model directory")
    return json.loads(cfg_path.read_text(encoding="utf-8"))


def _read_hf_weights(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    if (directory / "model.safetensors").is_file():
        return load_file(str(directory / "model.safetensors"))
    index = directory / "model.safetensors.index.json"
    if index.is_file():  # sharded: the index maps each tensor to its shard
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        state: dict[str, torch.Tensor] = {}
        for shard in shards:
            state.update(load_file(str(directory / shard)))
        return state
    if (directory / "pytorch_model.bin").is_file():
        return torch.load(directory / "pytorch_model.bin", map_location="cpu",
                          weights_only=True)
    raise ScratchError(f"{directory}: no model.safetensors, safetensors index or "
                       "pytorch_model.bin found")


def from_hf(model_or_dir) -> GPT:
    """A GPT with the weights of a Hugging Face GPT2LMHeadModel / LlamaForCausalLM, given the
    model object or a directory saved by `save_pretrained`."""
    if isinstance(model_or_dir, (str, os.PathLike)):
        cfg = config_from_hf(_read_hf_config(Path(model_or_dir)))
        hf_state = _read_hf_weights(Path(model_or_dir))
    else:
        cfg = config_from_hf(model_or_dir.config.to_dict())
        hf_state = model_or_dir.state_dict()
    model = GPT(cfg)
    state = state_from_hf(cfg, hf_state)
    check_state(model, state, "Hugging Face weights")
    model.load_state_dict({k: v.float() for k, v in state.items()},
                          strict=not cfg.tie_embeddings)
    return model


def _classifier_parts(model: GPT, classifier: dict | None) -> tuple[dict, dict]:
    """Config entries and tensors that make a causal LM export a ...ForSequenceClassification
    one: `classifier` holds the head's weight (n_labels, n_embd), labels, pad id, pooling."""
    if classifier is None:
        return {}, {}
    if classifier["pooling"] != "last":
        raise ScratchError("Hugging Face's ...ForSequenceClassification reads the last "
                           "non-padding token; a mean-pooled classifier cannot be exported")
    labels = classifier["labels"]
    cfg = {"num_labels": len(labels), "id2label": dict(enumerate(labels)),
           "label2id": {label: i for i, label in enumerate(labels)},
           "pad_token_id": classifier["pad_id"]}
    return cfg, {"score.weight": classifier["weight"].detach().float().cpu()}


def _hf_config(model: GPT, classifier: dict | None) -> dict:
    hf_cfg = {**config_to_hf(model.config), **_classifier_parts(model, classifier)[0]}
    if classifier is not None:
        arch = hf_cfg["architectures"][0]
        hf_cfg["architectures"] = [arch.replace("LMHeadModel", "ForSequenceClassification")
                                   .replace("ForCausalLM", "ForSequenceClassification")]
    return hf_cfg


def _hf_tensors(model: GPT, classifier: dict | None) -> dict[str, torch.Tensor]:
    state = state_to_hf(model)
    extra = _classifier_parts(model, classifier)[1]
    if extra:  # a sequence classifier has no language-model head
        state.pop("lm_head.weight", None)
    return {**state, **extra}


def to_hf(model: GPT, classifier: dict | None = None):
    """The same model as a `transformers` GPT2LMHeadModel or LlamaForCausalLM (eval mode); with
    `classifier` (see `_classifier_parts`), a GPT2/LlamaForSequenceClassification."""
    import transformers

    hf_cfg = _hf_config(model, classifier)
    arch = hf_cfg.pop("architectures")[0]
    kind = hf_cfg.pop("model_type")
    config = transformers.AutoConfig.for_model(kind, **hf_cfg)
    hf_model = getattr(transformers, arch)(config)
    missing, unexpected = hf_model.load_state_dict(_hf_tensors(model, classifier), strict=False)
    missing = [k for k in missing if k != "lm_head.weight" or not model.config.tie_embeddings]
    if missing or unexpected:
        raise ScratchError(f"weights do not fit {arch}: missing {missing[:3]}, "
                           f"unexpected {unexpected[:3]}")
    return hf_model.eval()


def save_hf(model: GPT, directory: str | os.PathLike, tokenizer=None,
            classifier: dict | None = None, template=None) -> Path:
    """Write a directory that `AutoModelForCausalLM.from_pretrained` (with `classifier`:
    `AutoModelForSequenceClassification`) and, with a tokenizer, `AutoTokenizer.from_pretrained`
    load: config.json, model.safetensors, tokenizer files. A prompt `template`
    (scratchlm.templates) becomes the tokenizer's `chat_template`, its end-of-turn token the
    end-of-sequence token, so `apply_chat_template` and `generate` work as ours do."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    hf_cfg = _hf_config(model, classifier)
    hf_cfg["torch_dtype"] = "float32"
    eos = template.end if template is not None else "<|endoftext|>"
    if tokenizer is not None and tokenizer.eot_id is not None:
        hf_cfg["bos_token_id"] = tokenizer.eot_id
        hf_cfg["eos_token_id"] = tokenizer.special_tokens.get(eos, tokenizer.eot_id)
    save_tensors({k: v.float().cpu() for k, v in _hf_tensors(model, classifier).items()},
                 directory / "model.safetensors")
    atomic_write_text(directory / "config.json", json.dumps(hf_cfg, indent=2))
    if tokenizer is not None:
        from scratchlm.tokenizer.fast import to_hf_tokenizer

        atomic_write_text(directory / "tokenizer.json", to_hf_tokenizer(tokenizer).to_str())
        eot = "<|endoftext|>" if tokenizer.eot_id is not None else None
        config = {"tokenizer_class": "PreTrainedTokenizerFast",
                  "model_max_length": model.config.block_size, "bos_token": eot,
                  "eos_token": eos if eot else None,
                  "pad_token": eot if classifier is not None else None,
                  "clean_up_tokenization_spaces": False}
        if template is not None:
            config["chat_template"] = template.jinja
        atomic_write_text(directory / "tokenizer_config.json", json.dumps(config, indent=2))
    return directory
