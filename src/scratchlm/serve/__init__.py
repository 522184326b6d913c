"""`scratchlm serve`: an OpenAI-compatible server with continuous batching and a chat page.

    from scratchlm.serve import build_app
    app = build_app("runs/demo")           # a FastAPI app; run it with uvicorn

See app.py for the API and engine.py for how requests share forward passes.
"""

from __future__ import annotations

import errno
import os
import socket
from pathlib import Path

from scratchlm.serve.app import create_app
from scratchlm.serve.engine import Engine

__all__ = ["Engine", "bind", "build_app", "create_app", "default_model_name", "run"]


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
    from scratchlm.generate import check_half_precision
    from scratchlm.model.load import load_pretrained
    from scratchlm.quantize import quantization_label
    from scratchlm.quantize import quantize as quantize_model
    from scratchlm.templates import load_template

    if max_batch < 1 or max_pending < max_batch:
        raise ScratchError(f"need 1 <= max_batch <= max_pending, got max_batch {max_batch}, "
                           f"max_pending {max_pending}")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    check_half_precision(quantize, device)
    net, tok, model_dir = load_pretrained(model, device, tokenizer)
    if quantize:
        quantize_model(net, quantize)
    engine = Engine(net, max_batch, max_pending, use_kv_cache)
    return create_app(engine, tok, model_name or default_model_name(model_dir),
                      load_template(model_dir), api_key, quantization_label(net))


def bind(host: str = "127.0.0.1", port: int = 8000) -> socket.socket:
    """The server's listening socket on host:port (port 0: any free port). `scratchlm serve`
    opens it before the model loads, so a bad or busy port is refused in the first second
    with one line, and nothing can take the port between that check and the start."""
    from scratchlm.errors import ScratchError

    if not 0 <= port <= 65535:
        raise ScratchError(f"--port must be 0 to 65535 (0: any free port), got {port}")
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as e:
        raise ScratchError(f"cannot listen on --host {host}: {e.strerror}; give an address "
                           "of this machine (127.0.0.1 for loopback)") from None
    sock = socket.socket(family, kind, proto)
    # as uvicorn does: a restarted server may take the port while old connections linger
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as e:
        sock.close()
        fix = {errno.EADDRINUSE: f"port {port} is in use; choose another --port",
               errno.EACCES: f"port {port} needs privileges here; choose a --port above 1023",
               errno.EADDRNOTAVAIL: f"{host} is not an address of this machine; choose "
                                    "another --host"}.get(
            e.errno, f"cannot listen on {host}:{port} ({e.strerror}); choose another --host "
                     "or --port")
        raise ScratchError(fix) from None
    # Listening now holds the port (a socket only bound, with SO_REUSEADDR, can still be
    # shared); clients that connect while the model loads wait in the backlog.
    sock.listen()
    sock.set_inheritable(True)
    return sock


def run(app, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info",
        sock: socket.socket | None = None) -> None:
    """Serve `app` with uvicorn until interrupted, on `sock` (from `bind`) or on host:port."""
    import uvicorn

    sock = sock or bind(host, port)
    server = uvicorn.Server(uvicorn.Config(app, log_level=log_level))
    server.run(sockets=[sock])
