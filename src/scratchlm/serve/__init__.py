"""`scratchlm serve`: an OpenAI-compatible server with continuous batching and a chat page.

    from scratchlm.serve import build_app
    app = build_app("runs/demo")           # a FastAPI app; run it with uvicorn

See app.py for the API and engine.py for how requests share forward passes.
"""

from __future__ import annotations

import os
from pathlib import Path

from scratchlm.serve.app import create_app
from scratchlm.serve.engine import Engine

__all__ = ["Engine", "build_app", "create_app", "default_model_name", "run"]


def default_model_name(model_dir: Path) -> str:
    """The directory's name, or its run's name for a run's final/ model (runs/demo/final ->
    "demo")."""
    model_dir = Path(model_dir).resolve()
    return model_dir.parent.name if model_dir.name == "final" else model_dir.name


def build_app(model: str | os.PathLike, tokenizer: str | os.PathLike | None = None,
              quantize: str | None = None, api_key: str | None = None, max_batch: int = 16,
              max_pending: int = 64, model_name: str | None = None,
              device: str | None = None, use_kv_cache: bool = True):
    """The server's app for a run, model or Hugging Face directory."""
    import torch

    from scratchlm.errors import ScratchError
    from scratchlm.model.load import load_pretrained
    from scratchlm.quantize import quantization_label
    from scratchlm.quantize import quantize as quantize_model
    from scratchlm.templates import load_template

    if max_batch < 1 or max_pending < max_batch:
        raise ScratchError(f"need 1 <= max_batch <= max_pending, got max_batch {max_batch}, "
                           f"max_pending {max_pending}")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    net, tok, model_dir = load_pretrained(model, device, tokenizer)
    if quantize:
        quantize_model(net, quantize)
    engine = Engine(net, max_batch, max_pending, use_kv_cache)
    return create_app(engine, tok, model_name or default_model_name(model_dir),
                      load_template(model_dir), api_key, quantization_label(net))


def run(app, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> None:
    """Serve `app` with uvicorn until interrupted."""
    import uvicorn

    uvicorn.run(app, host=host, port=port, log_level=log_level)
