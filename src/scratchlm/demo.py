"""`scratchlm demo`: every stage that has landed, on the built-in Shakespeare corpus.

What is already built in the run directory (with the same config) is reused, so a second run
only redoes what changed. The figures land in `report.md` in the run directory.
"""

from __future__ import annotations

import json
from pathlib import Path

from scratchlm.config import Config, save_config, to_dict
from scratchlm.data.builtin import iter_scenes
from scratchlm.tokenizer import BPETokenizer
from scratchlm.tokenizer.stats import tokenizer_stats
from scratchlm.utils import atomic_write_text

HOLDOUT_EVERY = 20  # every 20th scene is held out from tokenizer training (5%)


def build_tokenizer(cfg: Config, out: Path, progress: bool) -> tuple[BPETokenizer, bool]:
    """Train the tokenizer on the training scenes, or reuse the one trained with this config."""
    tok_dir = out / "tokenizer"
    stamp = tok_dir / "trained_with.json"
    wanted = json.dumps(to_dict(cfg.tokenizer), sort_keys=True)
    if stamp.is_file() and stamp.read_text() == wanted:
        print(f"[tokenizer] reusing {tok_dir}")
        return BPETokenizer.load(tok_dir), True
    print(f"[tokenizer] training a {cfg.tokenizer.vocab_size:,}-token byte-level BPE")
    train = (s.text for i, s in enumerate(iter_scenes()) if i % HOLDOUT_EVERY)
    tok = BPETokenizer.train(train, cfg.tokenizer.vocab_size, cfg.tokenizer.pattern,
                             cfg.tokenizer.special_tokens, progress=progress)
    tok.save(tok_dir)
    atomic_write_text(stamp, wanted)
    return tok, False


def run_demo(cfg: Config, out: Path, progress: bool = True) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    tok, reused = build_tokenizer(cfg, out, progress)
    held_out = [s.text for i, s in enumerate(iter_scenes()) if i % HOLDOUT_EVERY == 0]
    stats = tokenizer_stats(tok, held_out)
    sample = held_out[0].split("\n\n")[1]
    ids = tok.encode(sample)
    assert tok.decode(ids) == sample, "round trip failed"
    shown = " | ".join(tok.decode([i]) for i in ids[:24])
    print(f"[tokenizer] held-out bytes/token {stats['bytes_per_token']:.3f}, "
          f"vocab used {100 * stats['vocab_used_fraction']:.1f}%")
    report = "\n".join([
        "# scratchlm demo report",
        "",
        "## Tokenizer",
        "",
        f"- {tok!r}, pattern `{cfg.tokenizer.pattern}`"
        f"{' (reused from an earlier run)' if reused else ''}",
        f"- trained on {HOLDOUT_EVERY - 1} of every {HOLDOUT_EVERY} scenes of the built-in corpus",
        f"- held-out scenes: {stats['bytes']:,} bytes -> {stats['tokens']:,} tokens, "
        f"**{stats['bytes_per_token']:.3f} bytes/token**",
        f"- vocabulary used on held-out text: {stats['vocab_used']:,} of {stats['vocab_size']:,}",
        "",
        "A held-out speech, split into its first tokens:",
        "",
        "```",
        shown,
        "```",
        "",
    ])
    return atomic_write_text(out / "report.md", report)
