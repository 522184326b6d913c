"""`scratchlm convert`: a model directory in one format written in the other, whole or not at
all (the output is filled in a temporary directory that replaces --out only when complete).

- Hugging Face -> scratchlm: the weights (GPT-2 or Llama) and the tokenizer.
- scratchlm -> Hugging Face: a causal LM (its prompt template as the tokenizer's
  chat_template), a classifier as ...ForSequenceClassification, or a LoRA model as the base
  model plus its adapters in peft's format (in adapter/).
"""

from __future__ import annotations

import os
from pathlib import Path

from scratchlm.utils import atomic_dir


def from_hf_dir(source: str | os.PathLike, out: str | os.PathLike, tokenizer=None,
                overwrite: bool = False) -> str:
    from scratchlm.model.checkpoint import save_model
    from scratchlm.model.load import load_pretrained

    model, tok, _ = load_pretrained(source, tokenizer=tokenizer)
    with atomic_dir(out, overwrite) as tmp:
        save_model(model, tmp, tok)
    return (f"converted {source} ({model.num_params() / 1e6:.1f}M parameters) and its "
            f"tokenizer to {out}")


def to_hf_dir(source: str | os.PathLike, out: str | os.PathLike, tokenizer=None,
              overwrite: bool = False) -> str:
    from scratchlm.model.hf import save_hf
    from scratchlm.model.load import load_pretrained, load_tokenizer, model_dir
    from scratchlm.templates import load_template

    d = model_dir(source)
    template = load_template(d)
    if (d / "adapter.json").is_file():
        from scratchlm.model.checkpoint import load_model
        from scratchlm.model.lora import save_peft

        model = load_model(d)  # the adapters kept apart, not merged
        with atomic_dir(out, overwrite) as tmp:
            save_hf(model, tmp, load_tokenizer(tokenizer or d), template=template)
            save_peft(model, tmp / "adapter")
        return (f"wrote the base model to {out} and its LoRA adapters to "
                f"{Path(out) / 'adapter'} (peft.PeftModel.from_pretrained loads them)")
    if (d / "classifier.json").is_file():
        from scratchlm.finetune.classify import Classifier

        clf = Classifier(d)
        with atomic_dir(out, overwrite) as tmp:
            save_hf(clf.model, tmp, clf.tokenizer, classifier=clf.hf_spec())
        return (f"wrote a Hugging Face sequence classifier to {out} "
                "(AutoModelForSequenceClassification.from_pretrained loads it)")
    model, tok, _ = load_pretrained(d, tokenizer=tokenizer)
    with atomic_dir(out, overwrite) as tmp:
        save_hf(model, tmp, tok, template=template)
    return f"wrote a Hugging Face model to {out} (AutoModelForCausalLM.from_pretrained loads it)"
