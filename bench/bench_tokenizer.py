"""Tokenizer benchmark: scratchlm vs Hugging Face `tokenizers` and tiktoken, side by side.

  python bench/bench_tokenizer.py            (or `make bench`)

Training: vocab 8,192 on Tiny Shakespeare + six Austen novels (5.1 MB), the first 90% of each
file; bytes per token on the last 10%. Encoding: MB/s on the whole 5.1 MB, one thread.
Prints a Markdown table (pasted into the README) and writes bench/out/tokenizer.json.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import results as results_file
from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers

from scratchlm.tokenizer import GPT4_PATTERN, BPETokenizer, from_gpt2, tiktoken_gpt2
from scratchlm.tokenizer.fast import to_hf_tokenizer, to_tiktoken
from scratchlm.utils import data_dir

VOCAB = 8192
REPEATS = 3


def best_time(fn, repeats: int = REPEATS) -> tuple[float, object]:
    """Fastest of `repeats` runs (the least disturbed by other work on the machine)."""
    best, result = float("inf"), None
    for _ in range(repeats):
        t = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - t)
    return best, result


def split_corpus(tmp: Path) -> tuple[list[Path], str, str]:
    files = [data_dir() / "corpus" / "tinyshakespeare.txt",
             *sorted((data_dir() / "corpus" / "austen").glob("*.txt"))]
    train_files, held, whole = [], [], []
    for f in files:
        text = f.read_text(encoding="utf-8")
        cut = text.index("\n", int(len(text) * 0.9)) + 1
        (tmp / f.name).write_text(text[:cut], encoding="utf-8")
        train_files.append(tmp / f.name)
        held.append(text[cut:])
        whole.append(text)
    return train_files, "".join(held), "".join(whole)


def hf_train(files: list[Path]) -> Tokenizer:
    hf = Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(GPT4_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    # Whole files, as scratchlm reads them: `hf.train(paths)` would feed it line by line, which
    # splits runs of blank lines differently and so learns from different chunks.
    hf.train_from_iterator((f.read_text(encoding="utf-8") for f in files), trainer)
    return hf


def main() -> dict:
    rows: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        files, held, whole = split_corpus(Path(tmp))
        mb = len(whole.encode()) / 1e6
        t_ours, ours = best_time(lambda: BPETokenizer.train(files, VOCAB, progress=False))
        t_hf, hf = best_time(lambda: hf_train(files))
    held_bytes = len(held.encode())
    bpt_ours = held_bytes / len(ours.encode_ordinary(held))
    bpt_hf = held_bytes / len(hf.encode(held).ids)
    rows["train"] = {"scratchlm_s": t_ours, "hf_s": t_hf, "ratio": t_ours / t_hf,
                     "bpt_scratchlm": bpt_ours, "bpt_hf": bpt_hf,
                     "bpt_diff_pct": 100 * (bpt_ours / bpt_hf - 1), "corpus_mb": mb}

    gpt2_dir = data_dir() / "gpt2"
    gpt2 = from_gpt2(gpt2_dir / "encoder.json", gpt2_dir / "vocab.bpe")
    ref = tiktoken_gpt2(gpt2_dir)
    enc = {}
    for name, tok in [("gpt2 files", gpt2), ("trained 8k", ours)]:
        fast = to_tiktoken(tok)
        hf_tok = to_hf_tokenizer(tok)
        # The reference encoder caches chunks, so each repeat starts from a cold copy.
        t_ref, _ = best_time(lambda tok=tok: BPETokenizer(tok.merges, tok.pattern,
                                                          tok.special_tokens, tok.byte_ids
                                                          ).encode_ordinary(whole), 1)
        t_fast, _ = best_time(lambda fast=fast: fast.encode_ordinary(whole))
        t_hf_enc, _ = best_time(lambda hf_tok=hf_tok: hf_tok.encode(whole))
        enc[name] = {"scratch_mbs": mb / t_ref, "fast_mbs": mb / t_fast,
                     "hf_mbs": mb / t_hf_enc}
    t_tik, _ = best_time(lambda: ref.encode_ordinary(whole))
    enc["tiktoken gpt2"] = mb / t_tik
    rows["encode"] = enc

    tr = rows["train"]
    print(f"Training, vocab {VOCAB:,} on {mb:.1f} MB (90% train / 10% held out), "
          f"best of {REPEATS}:\n")
    print("| trainer | wall time | bytes/token on held-out |")
    print("|---|---|---|")
    print(f"| scratchlm `BPETokenizer.train` | {tr['scratchlm_s']:.2f} s "
          f"({tr['ratio']:.2f}× HF) | {tr['bpt_scratchlm']:.3f} ({tr['bpt_diff_pct']:+.2f}%) |")
    print(f"| HF `tokenizers` BpeTrainer | {tr['hf_s']:.2f} s | {tr['bpt_hf']:.3f} |")
    print(f"\nEncoding {mb:.1f} MB, one thread, MB/s (tiktoken's own gpt2: "
          f"{enc['tiktoken gpt2']:.1f} MB/s):\n")
    print("| vocabulary | from scratch | fast path (tiktoken) | fast / tiktoken gpt2 "
          "| HF tokenizer.json |")
    print("|---|---|---|---|---|")
    for name in ("gpt2 files", "trained 8k"):
        e = enc[name]
        print(f"| {name} | {e['scratch_mbs']:.1f} | {e['fast_mbs']:.1f} | "
              f"{e['fast_mbs'] / enc['tiktoken gpt2']:.2f}× | {e['hf_mbs']:.1f} |")
    results_file.save("tokenizer", rows)
    return rows


if __name__ == "__main__":
    main()
