"""Server benchmark: `scratchlm serve` under 1, 4 and 16 concurrent clients, batching on vs off.

  python bench/bench_serve.py [--model DIR]          (part of `make bench`)

The server runs in its own process (`python -m scratchlm serve`), once with continuous
batching (--max-batch 16) and once without (--max-batch 1: requests one after another). Each
client is a thread with OpenAI's own Python client sending completions (64 new tokens,
temperature 0.8, a seed per request) one after another. Reported: generated tokens per second
over the whole run (from each response's usage) and the p50 / p95 latency of a request.
The model is the demo's (runs/demo/final) when there is one, else a random model of its shape.
Prints a Markdown table (pasted into the README) and writes bench/out/serve.json.
"""

from __future__ import annotations

import argparse
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import results as results_file

ROOT = Path(__file__).resolve().parents[1]
CLIENTS = (1, 4, 16)
REQUESTS = {1: 8, 4: 16, 16: 32}  # per run, shared by the clients
MAX_TOKENS = 64
PROMPTS = ["ROMEO:", "First Citizen:\nBefore we proceed any further, hear me speak.",
           "KING HENRY:", "O, what a noble mind", "To be, or not to be", "JULIET:\nAy me!",
           "Now is the winter of our discontent", "Friends, Romans, countrymen"]


def demo_or_random_model(path: str | None, scratch: Path) -> Path:
    if path:
        return Path(path)
    demo = ROOT / "runs" / "demo" / "final"
    if (demo / "config.json").is_file():
        return demo
    from scratchlm.model import GPT, ModelConfig
    from scratchlm.model.checkpoint import save_model
    from scratchlm.tokenizer import BPETokenizer
    from scratchlm.utils import data_dir

    text = (data_dir() / "corpus" / "tinyshakespeare.txt").read_text(encoding="utf-8")
    tok = BPETokenizer.train(text[:300_000], 1024, progress=False)
    cfg = ModelConfig.from_preset("llama-tiny", vocab_size=1024, block_size=256, n_layer=4,
                                  n_head=4, n_kv_head=4, n_embd=256, intermediate_size=768,
                                  tie_embeddings=True)
    return save_model(GPT(cfg), scratch / "random-demo-shape", tok)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: Path, max_batch: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "scratchlm", "serve", "--model", str(model),
                             "--port", str(port), "--max-batch", str(max_batch),
                             "--max-pending", "64", "--log-level", "warning"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited: {proc.stderr.read()}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("the server did not come up in 120 s")


def run_clients(url: str, model_id: str, clients: int) -> dict:
    n = REQUESTS[clients]
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=600)

    def one(i: int) -> tuple[float, int]:
        t = time.perf_counter()
        r = client.completions.create(model=model_id, prompt=PROMPTS[i % len(PROMPTS)],
                                      max_tokens=MAX_TOKENS, temperature=0.8, seed=i)
        return time.perf_counter() - t, r.usage.completion_tokens

    one(0)  # warm up
    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        done = list(pool.map(one, range(n)))
    wall = time.perf_counter() - start
    latencies = sorted(d for d, _ in done)
    return {"requests": n, "tokens": sum(k for _, k in done), "seconds": wall,
            "tokens_per_s": sum(k for _, k in done) / wall,
            "p50": statistics.median(latencies),
            "p95": latencies[min(len(latencies) - 1, round(0.95 * (len(latencies) - 1)))]}


def main() -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="model to serve (default: the demo's)")
    args, _ = parser.parse_known_args()
    results: dict = {"runs": {}}
    with tempfile.TemporaryDirectory() as scratch:
        model = demo_or_random_model(args.model, Path(scratch))
        results["model"] = str(model)
        for batching, max_batch in (("on", 16), ("off", 1)):
            proc, url = start_server(model, max_batch)
            try:
                model_id = httpx.get(f"{url}/v1/models").json()["data"][0]["id"]
                for clients in CLIENTS:
                    results["runs"][f"{clients}/{batching}"] = run_clients(url, model_id,
                                                                           clients)
            finally:
                proc.terminate()
                proc.wait(timeout=30)
    print(f"Server: {results['model']}, completions of {MAX_TOKENS} tokens (temperature 0.8), "
          "each client sending its next request when the last one is answered; tokens/s over "
          "the whole run, latency per request:\n")
    print("| clients | batching | requests | tokens/s | p50 latency | p95 latency | "
          "tokens/s vs batching off |")
    print("|---|---|---|---|---|---|---|")
    for clients in CLIENTS:
        off = results["runs"][f"{clients}/off"]
        for batching in ("on", "off"):
            r = results["runs"][f"{clients}/{batching}"]
            print(f"| {clients} | {batching} | {r['requests']} | {r['tokens_per_s']:,.0f} | "
                  f"{r['p50']:.2f} s | {r['p95']:.2f} s | "
                  f"{r['tokens_per_s'] / off['tokens_per_s']:.2f}× |")
    results_file.save("serve", results)
    return results


if __name__ == "__main__":
    main()
