"""The `scratchlm` command: one verb per pipeline stage.

Each verb parses its flags here and calls the library; a ScratchError (bad input) is printed as
one line, `error: ...`, with exit status 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from scratchlm import __version__
from scratchlm.errors import ScratchError


def read_stdin_text(errors: str) -> str:
    data = sys.stdin.buffer.read()
    try:
        return data.decode("utf-8", errors=errors)
    except UnicodeDecodeError as e:
        raise ScratchError(f"standard input is not valid UTF-8 at byte offset {e.start}; "
                           "convert it to UTF-8 or pass --errors replace") from None


# ------------------------------------------------------------------------------------------------
# tokenizer


def cmd_tokenizer_train(args: argparse.Namespace, _: list[str]) -> int:
    from scratchlm.data.readers import expand_paths
    from scratchlm.tokenizer import BPETokenizer

    sources: list = expand_paths(args.input) if args.input else []
    if args.builtin:
        from scratchlm.data.builtin import iter_scenes

        sources.append(s.text for s in iter_scenes())
    if not sources:
        raise ScratchError("no training text: pass --input PATH... and/or --builtin")
    tok = BPETokenizer.train(sources, args.vocab_size, args.pattern, args.special_tokens,
                             errors=args.errors, progress=not args.quiet)
    path = tok.save(args.out)
    print(f"trained {tok!r}; wrote {path} and {path.parent / 'tokenizer.json'}")
    return 0


def cmd_tokenizer_encode(args: argparse.Namespace, _: list[str]) -> int:
    from scratchlm.tokenizer import BPETokenizer

    tok = BPETokenizer.load(args.tokenizer)
    text = read_stdin_text(args.errors)
    allowed = "all" if args.allow_special else ()
    ids = (tok.encode(text, allowed_special=allowed) if args.reference
           else tok.encode_batch([text], allowed_special=allowed)[0])
    print(" ".join(map(str, ids)))
    return 0


def cmd_tokenizer_decode(args: argparse.Namespace, _: list[str]) -> int:
    from scratchlm.tokenizer import BPETokenizer

    tok = BPETokenizer.load(args.tokenizer)
    words = sys.stdin.read().split()
    try:
        ids = [int(w) for w in words]
    except ValueError:
        bad = next(w for w in words if not w.lstrip("-").isdigit())
        raise ScratchError(f"standard input must be whitespace-separated token ids; "
                           f"found {bad!r}") from None
    sys.stdout.buffer.write(tok.decode_bytes(ids))
    sys.stdout.flush()
    return 0


def cmd_tokenizer_stats(args: argparse.Namespace, _: list[str]) -> int:
    from scratchlm.data.readers import expand_paths
    from scratchlm.tokenizer import BPETokenizer
    from scratchlm.tokenizer.stats import format_stats, tokenizer_stats

    tok = BPETokenizer.load(args.tokenizer)
    print(format_stats(tokenizer_stats(tok, expand_paths(args.input), args.errors)))
    return 0


def cmd_tokenizer_import_gpt2(args: argparse.Namespace, _: list[str]) -> int:
    from scratchlm.tokenizer import from_gpt2

    d = Path(args.gpt2_dir)
    tok = from_gpt2(d / "encoder.json", d / "vocab.bpe")
    path = tok.save(args.out)
    print(f"imported {tok!r}; wrote {path}")
    return 0


def cmd_tokenizer_export_gpt2(args: argparse.Namespace, _: list[str]) -> int:
    from scratchlm.tokenizer import BPETokenizer, save_gpt2

    save_gpt2(BPETokenizer.load(args.tokenizer), args.out)
    print(f"wrote {Path(args.out) / 'encoder.json'} and {Path(args.out) / 'vocab.bpe'}")
    return 0


# ------------------------------------------------------------------------------------------------
# data


def cmd_data_prepare(args: argparse.Namespace, overrides: list[str]) -> int:
    from scratchlm.config import Config, load_config
    from scratchlm.data.prepare import prepare, summary_table

    cfg = load_config(Config, args.config, overrides)
    if not args.input and not args.builtin:
        raise ScratchError("no input: pass --input PATH... and/or --builtin")
    documents = None
    if args.builtin:
        if args.input:
            raise ScratchError("give --input or --builtin, not both")
        from scratchlm.data.builtin import iter_scenes

        documents = (s.text for s in iter_scenes())
    manifest = prepare(args.input or [], args.tokenizer, args.out, cfg.data,
                       progress=not args.quiet, documents=documents,
                       documents_name="builtin:shakespeare")
    print(summary_table(manifest))
    print(f"wrote {len(manifest['shards'])} shard(s) and manifest.json to {args.out}")
    return 0

# ------------------------------------------------------------------------------------------------
# pretrain


def resolve_recipe(name: str | None) -> Path | None:
    """A config path as given, or a recipe name from the project's configs/ directory."""
    if name is None:
        return None
    path = Path(name)
    if path.is_file() or path.suffix in (".yaml", ".yml"):
        return path
    recipe = Path(__file__).resolve().parents[2] / "configs" / f"{name}.yaml"
    if recipe.is_file():
        return recipe
    raise ScratchError(f"no config file {name!r} and no recipe configs/{name}.yaml")


def cmd_pretrain(args: argparse.Namespace, overrides: list[str]) -> int:
    from scratchlm.config import Config, load_config
    from scratchlm.parallel import barrier, is_main, teardown
    from scratchlm.train.pretrain import run_pretraining

    cfg = load_config(Config, resolve_recipe(args.config), overrides)
    try:
        summary = run_pretraining(cfg, Path(args.out), resume=args.resume,
                                  progress=not args.quiet)
        barrier()  # no rank leaves the group while another still talks to it
    finally:
        main_rank = is_main()
        teardown()
    if not main_rank:
        return 0
    val = summary["val"]
    print(f"done: {summary['steps']} steps, {summary['tokens']:,} tokens in "
          f"{summary['seconds']:.0f} s; val loss {val['loss']:.3f}, bits/byte {val['bpb']:.3f}; "
          f"{summary['tokens_per_s']:,.0f} tokens/s, MFU {summary['mfu']:.1%}; "
          f"final model in {Path(args.out) / 'final'}")
    return 0

# ------------------------------------------------------------------------------------------------
# model: generate, chat, convert, memory


def load_for_generation(checkpoint: str, tokenizer_dir: str | None):
    """The model and tokenizer of a checkpoint directory (the tokenizer may live elsewhere)."""
    import torch

    from scratchlm.model.checkpoint import load_model
    from scratchlm.tokenizer import BPETokenizer

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = load_model(checkpoint, device)
    tok_dir = Path(tokenizer_dir or checkpoint)
    if not (tok_dir / "bpe.json").is_file():
        raise ScratchError(f"{tok_dir}: no tokenizer (bpe.json) beside the model; pass "
                           "--tokenizer DIR")
    tok = BPETokenizer.load(tok_dir)
    if tok.vocab_size > model.config.vocab_size:
        raise ScratchError(f"tokenizer has {tok.vocab_size} tokens but the model only "
                           f"{model.config.vocab_size}; they do not belong together")
    return model, tok


def sampling_kwargs(args: argparse.Namespace) -> dict:
    return dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                seed=args.seed, use_kv_cache=not args.no_cache,
                sliding_window=args.sliding_window)


def cmd_generate(args: argparse.Namespace, _: list[str]) -> int:
    from scratchlm.generate import stream_text

    model, tok = load_for_generation(args.checkpoint, args.tokenizer)
    for k in range(args.num_samples):
        if args.num_samples > 1:
            print(f"--- sample {k + 1}")
        kwargs = sampling_kwargs(args)
        if args.seed is not None:
            kwargs["seed"] = args.seed + k
        sys.stdout.write(args.prompt)
        for piece in stream_text(model, tok, args.prompt, args.max_new_tokens, stop=args.stop,
                                 **kwargs):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
    return 0


def cmd_chat(args: argparse.Namespace, _: list[str]) -> int:
    from scratchlm.generate import CHAT_STOP, chat_prompt, stream_text

    model, tok = load_for_generation(args.checkpoint, args.tokenizer)
    history: list[tuple[str, str]] = []
    print("chat: type a message and press enter; an empty line or Ctrl-D ends", flush=True)
    while True:
        try:
            message = input("> ").strip()
        except EOFError:
            break
        if not message:
            break
        prompt = chat_prompt(history, message, model.config.block_size - args.max_new_tokens,
                             tok)
        reply = ""
        for piece in stream_text(model, tok, prompt, args.max_new_tokens, stop=CHAT_STOP,
                                 **sampling_kwargs(args)):
            reply += piece
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        history.append((message, reply.strip()))
    return 0


def cmd_convert(args: argparse.Namespace, _: list[str]) -> int:
    from scratchlm.model.checkpoint import load_model, save_model
    from scratchlm.model.hf import from_hf, save_hf
    from scratchlm.tokenizer import BPETokenizer

    if bool(args.from_hf) == bool(args.to_hf):
        raise ScratchError("give exactly one of --from-hf DIR or --to-hf CHECKPOINT")
    if args.from_hf:
        model = from_hf(args.from_hf)
        save_model(model, args.out)
        print(f"converted {args.from_hf} ({model.num_params() / 1e6:.1f}M parameters) to "
              f"{args.out}")
    else:
        model = load_model(args.to_hf)
        tok_path = Path(args.to_hf) / "bpe.json"
        tok = BPETokenizer.load(args.to_hf) if tok_path.is_file() else None
        save_hf(model, args.out, tok)
        print(f"wrote a Hugging Face model to {args.out} "
              f"(AutoModelForCausalLM.from_pretrained loads it)")
    return 0


def cmd_memory(args: argparse.Namespace, overrides: list[str]) -> int:
    from scratchlm.config import Config, from_dict, parse_override
    from scratchlm.memory import count_params, estimate_memory
    from scratchlm.model.config import PRESETS, ModelConfig

    ModelConfig.from_preset(args.preset)  # an unknown name fails here, with a suggestion
    fields = {}
    for arg in overrides:
        key, value = parse_override(arg, Config)
        if not key.startswith("model."):
            raise ScratchError(f"{arg}: only --model.FIELD=VALUE overrides apply here")
        fields[key[len("model."):]] = value
    cfg = from_dict(ModelConfig, {**PRESETS[args.preset], **fields}, "model")
    est = estimate_memory(cfg, args.dtype, args.optimizer, args.zero, args.gpus,
                          args.micro_batch, args.seq, args.activation_checkpointing,
                          args.tp, args.pp)
    split = f", tp {args.tp} x pp {args.pp} ({est.params / 1e9:.3f}B per device)" \
        if args.tp * args.pp > 1 else ""
    print(f"{args.preset}: {count_params(cfg) / 1e9:.3f}B parameters, {args.dtype}, "
          f"{args.optimizer}, ZeRO-{args.zero} over {args.gpus} data-parallel device(s){split}, "
          f"micro-batch {args.micro_batch} x "
          f"{args.seq or cfg.block_size} tokens"
          f"{', activation checkpointing' if args.activation_checkpointing else ''}")
    print("per device:")
    print(est.table())
    return 0


# ------------------------------------------------------------------------------------------------
# demo


def cmd_demo(args: argparse.Namespace, overrides: list[str]) -> int:
    from scratchlm.config import Config, load_config
    from scratchlm.demo import run_demo

    cfg = load_config(Config, resolve_recipe(args.config or "demo"), overrides)
    report = run_demo(cfg, Path(args.out), progress=not args.quiet)
    print(f"demo finished; report: {report}")
    return 0


# ------------------------------------------------------------------------------------------------
# the parser


def config_keys(*sections: str) -> str:
    """The config keys of these sections with defaults and help (the fields' docstrings), for
    the --help of verbs that take --section.key=value overrides."""
    from scratchlm.config import Config, describe

    lines = ["config keys (override with --KEY=VALUE):"]
    for key, default, doc in describe(Config):
        if key.split(".")[0] in sections:
            lines += [f"  --{key}={default}", f"      {doc}"] if doc else [f"  --{key}={default}"]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="scratchlm",
        description="Build a large language model from scratch: tokenizer, data, model, "
                    "training, fine-tuning, alignment, evaluation.")
    parser.add_argument("--version", action="version", version=f"scratchlm {__version__}")
    verbs = parser.add_subparsers(dest="verb", metavar="VERB", required=True)

    tok = verbs.add_parser("tokenizer", help="train, use and convert byte-level BPE tokenizers")
    tok_verbs = tok.add_subparsers(dest="action", metavar="ACTION", required=True)

    train = tok_verbs.add_parser("train", help="train a tokenizer on text files")
    train.add_argument("--input", nargs="+", metavar="PATH",
                       help="UTF-8 text files or directories of them")
    train.add_argument("--builtin", action="store_true",
                       help="also train on the built-in Shakespeare corpus")
    train.add_argument("--vocab-size", type=int, required=True, metavar="N")
    train.add_argument("--out", required=True, metavar="DIR")
    train.add_argument("--pattern", default="gpt4",
                       help='split regex: "gpt2", "gpt4" (default) or a regex of your own')
    train.add_argument("--special-tokens", nargs="*", default=["<|endoftext|>"], metavar="TOK")
    train.add_argument("--errors", choices=["strict", "replace"], default="strict",
                       help="invalid UTF-8: stop with the byte offset (strict) or use U+FFFD")
    train.add_argument("--quiet", action="store_true", help="no progress bars")
    train.set_defaults(func=cmd_tokenizer_train)

    enc = tok_verbs.add_parser("encode", help="text on stdin -> token ids on stdout")
    enc.add_argument("--tokenizer", required=True, metavar="DIR")
    enc.add_argument("--allow-special", action="store_true",
                     help="encode special-token strings in the text as special tokens")
    enc.add_argument("--reference", action="store_true",
                     help="use the from-scratch encoder instead of the fast path (same ids)")
    enc.add_argument("--errors", choices=["strict", "replace"], default="strict")
    enc.set_defaults(func=cmd_tokenizer_encode)

    dec = tok_verbs.add_parser("decode", help="token ids on stdin -> text on stdout")
    dec.add_argument("--tokenizer", required=True, metavar="DIR")
    dec.set_defaults(func=cmd_tokenizer_decode)

    stats = tok_verbs.add_parser("stats", help="bytes per token and vocabulary usage on text")
    stats.add_argument("--tokenizer", required=True, metavar="DIR")
    stats.add_argument("--input", nargs="+", required=True, metavar="PATH")
    stats.add_argument("--errors", choices=["strict", "replace"], default="strict")
    stats.set_defaults(func=cmd_tokenizer_stats)

    imp = tok_verbs.add_parser("import-gpt2", help="convert OpenAI's encoder.json + vocab.bpe")
    imp.add_argument("--gpt2-dir", required=True, metavar="DIR",
                     help="directory holding encoder.json and vocab.bpe")
    imp.add_argument("--out", required=True, metavar="DIR")
    imp.set_defaults(func=cmd_tokenizer_import_gpt2)

    exp = tok_verbs.add_parser("export-gpt2", help="write encoder.json + vocab.bpe")
    exp.add_argument("--tokenizer", required=True, metavar="DIR")
    exp.add_argument("--out", required=True, metavar="DIR")
    exp.set_defaults(func=cmd_tokenizer_export_gpt2)

    data = verbs.add_parser("data", help="prepare training data: clean, dedup, tokenize, shard")
    data_verbs = data.add_subparsers(dest="action", metavar="ACTION", required=True)
    prep = data_verbs.add_parser(
        "prepare", help="raw text -> token shards + manifest.json",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=config_keys("data"),
        description="Reads txt/jsonl/parquet (optionally .gz/.zst), cleans, filters, removes "
                    "exact and near duplicates, tokenizes in worker processes and writes "
                    "shards. Any data key can be overridden, e.g. --data.filters.min_words=20 "
                    "or --data.dedup.threshold=0.9. An interrupted run resumes.")
    prep.add_argument("--input", nargs="+", metavar="PATH", help="files, directories, globs")
    prep.add_argument("--builtin", action="store_true", help="the built-in Shakespeare corpus")
    prep.add_argument("--tokenizer", required=True, metavar="DIR")
    prep.add_argument("--out", required=True, metavar="DIR")
    prep.add_argument("--config", default=None, metavar="YAML")
    prep.add_argument("--quiet", action="store_true", help="no progress bar")
    prep.set_defaults(func=cmd_data_prepare, accepts_overrides=True)

    pre = verbs.add_parser(
        "pretrain", help="train a model from scratch (tokenizer, data and model as configured)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=config_keys("tokenizer", "data", "model", "train", "parallel"),
        description="Trains a tokenizer and prepares data when the config does not point at "
                    "existing ones, then pretrains. Any config key can be overridden: "
                    "--train.max_steps=40 --model.n_layer=4 ...")
    pre.add_argument("--config", default=None, metavar="YAML",
                     help="a config file or a recipe name from configs/ (e.g. tiny-cpu)")
    pre.add_argument("--out", required=True, metavar="DIR")
    pre.add_argument("--resume", action="store_true",
                     help="continue from the newest good checkpoint in DIR")
    pre.add_argument("--quiet", action="store_true", help="no progress bars")
    pre.set_defaults(func=cmd_pretrain, accepts_overrides=True)

    def add_sampling(p: argparse.ArgumentParser) -> None:
        p.add_argument("--checkpoint", required=True, metavar="DIR")
        p.add_argument("--tokenizer", default=None, metavar="DIR",
                       help="tokenizer directory, if not saved beside the model")
        p.add_argument("--max-new-tokens", type=int, default=200, metavar="N")
        p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
        p.add_argument("--top-k", type=int, default=None, metavar="K")
        p.add_argument("--top-p", type=float, default=None, metavar="P")
        p.add_argument("--seed", type=int, default=None)
        p.add_argument("--no-cache", action="store_true",
                       help="recompute the whole sequence every step (no KV cache)")
        p.add_argument("--sliding-window", action="store_true",
                       help="keep the last block_size tokens instead of stopping at the context")

    gen = verbs.add_parser("generate", help="sample text from a checkpoint")
    add_sampling(gen)
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--stop", nargs="*", default=[], metavar="STR",
                     help="stop before any of these strings")
    gen.add_argument("--num-samples", type=int, default=1, metavar="N")
    gen.set_defaults(func=cmd_generate)

    chat = verbs.add_parser("chat", help="an interactive chat loop with streaming output")
    add_sampling(chat)
    chat.set_defaults(func=cmd_chat)

    conv = verbs.add_parser("convert", help="Hugging Face transformers <-> scratchlm")
    conv.add_argument("--from-hf", metavar="DIR", help="a GPT-2 / Llama save_pretrained dir")
    conv.add_argument("--to-hf", metavar="CHECKPOINT", help="a scratchlm model directory")
    conv.add_argument("--out", required=True, metavar="DIR")
    conv.set_defaults(func=cmd_convert)

    mem = verbs.add_parser(
        "memory", help="estimate training memory per device",
        description="Per-device memory of training a model; override any model field with "
                    "--model.FIELD=VALUE (e.g. --model.n_layer=48).")
    mem.add_argument("--preset", default="gpt2-124m", help="a model preset (see --help)")
    mem.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="bf16")
    mem.add_argument("--optimizer", choices=["adamw", "sgd"], default="adamw")
    mem.add_argument("--zero", type=int, choices=[0, 1, 2, 3], default=0)
    mem.add_argument("--gpus", type=int, default=1, help="data-parallel devices (ZeRO shards "
                     "over these)")
    mem.add_argument("--tp", type=int, default=1, help="tensor-parallel devices (with sequence "
                     "parallelism)")
    mem.add_argument("--pp", type=int, default=1, help="pipeline stages (1F1B); the largest "
                     "stage is reported")
    mem.add_argument("--micro-batch", type=int, default=1)
    mem.add_argument("--seq", type=int, default=None, help="tokens per sequence (default: "
                     "the model's context)")
    mem.add_argument("--activation-checkpointing", action="store_true")
    mem.set_defaults(func=cmd_memory, accepts_overrides=True)

    demo = verbs.add_parser(
        "demo", help="the whole pipeline on the built-in corpus",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=config_keys("tokenizer", "data", "model", "train"),
        description="Runs every stage that has landed on the built-in Shakespeare corpus; any "
                    "config key can be overridden with --section.key=value.")
    demo.add_argument("--out", default="runs/demo", metavar="DIR")
    demo.add_argument("--config", default=None, metavar="YAML",
                      help="a config file or recipe name (default: configs/demo.yaml)")
    demo.add_argument("--quiet", action="store_true", help="no progress bars")
    demo.set_defaults(func=cmd_demo, accepts_overrides=True)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    overrides = [a for a in extra if a.startswith("--") and "." in a.split("=", 1)[0]]
    unknown = [a for a in extra if a not in overrides]
    if unknown or (overrides and not getattr(args, "accepts_overrides", False)):
        parser.error(f"unrecognized arguments: {' '.join(unknown or overrides)}")
    try:
        return args.func(args, overrides)
    except ScratchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
