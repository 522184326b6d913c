"""The `scratchlm` command: one verb per pipeline stage.

Each verb parses its flags here and calls the library; a ScratchError (bad input) is printed as
one line, `error: ...`, with exit status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import re
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

from scratchlm import __version__
from scratchlm.config import resolve_recipe
from scratchlm.errors import ScratchError
from scratchlm.utils import atomic_dir, check_output_dir


def unescape(text: str) -> str:
    """A flag value with \\n, \\t and \\\\ read as a newline, a tab, a backslash: what a
    user means by `--stop "\\n\\n"` (the shell passes the backslashes through)."""
    return re.sub(r"\\(.)", lambda m: {"n": "\n", "t": "\t"}.get(m[1], m[1]), text)


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
    from scratchlm.data.builtin import BUILTIN, split_inputs
    from scratchlm.data.readers import expand_paths
    from scratchlm.tokenizer import BPETokenizer

    _, builtin = split_inputs([BUILTIN] if args.builtin else [])
    sources: list = expand_paths(args.input) if args.input else []
    if builtin is not None:
        sources.append(builtin)
    if not sources:
        raise ScratchError("no training text: pass --input PATH... and/or --builtin")
    check_output_dir(args.out, args.overwrite)  # before the work, not only after it
    tok = BPETokenizer.train(sources, args.vocab_size, args.pattern, args.special_tokens,
                             errors=args.errors, progress=not args.quiet)
    with atomic_dir(args.out, args.overwrite) as tmp:
        tok.save(tmp)
    out = Path(args.out)
    print(f"trained {tok!r}; wrote {out / 'bpe.json'} and {out / 'tokenizer.json'}")
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
    with atomic_dir(args.out, args.overwrite) as tmp:
        tok.save(tmp)
    print(f"imported {tok!r}; wrote {Path(args.out) / 'bpe.json'}")
    return 0


def cmd_tokenizer_export_gpt2(args: argparse.Namespace, _: list[str]) -> int:
    from scratchlm.tokenizer import BPETokenizer, save_gpt2

    tok = BPETokenizer.load(args.tokenizer)
    with atomic_dir(args.out, args.overwrite) as tmp:
        save_gpt2(tok, tmp)
    print(f"wrote {Path(args.out) / 'encoder.json'} and {Path(args.out) / 'vocab.bpe'}")
    return 0


# ------------------------------------------------------------------------------------------------
# data


def cmd_data_prepare(args: argparse.Namespace, overrides: list[str]) -> int:
    from scratchlm.config import Config, load_config
    from scratchlm.data.builtin import BUILTIN, BUILTIN_NAME, split_inputs
    from scratchlm.data.prepare import prepare, summary_table

    cfg = load_config(Config, resolve_recipe(args.config), overrides)
    if not args.input and not args.builtin:
        raise ScratchError("no input: pass --input PATH... or --builtin")
    if args.input and args.builtin:
        raise ScratchError("give --input or --builtin, not both")
    # The manifest records what was really read.
    data = dataclasses.replace(cfg.data, inputs=[BUILTIN] if args.builtin else args.input)
    paths, documents = split_inputs(data.inputs)
    if args.address is not None and args.engine != "ray":
        raise ScratchError("--address is for --engine ray; add --engine ray or drop --address")
    manifest = prepare(paths, args.tokenizer, args.out, data, progress=not args.quiet,
                       documents=documents, documents_name=BUILTIN_NAME, engine=args.engine,
                       address=args.address)
    print(summary_table(manifest))
    print(f"wrote {len(manifest['shards'])} shard(s) and manifest.json to {args.out}")
    return 0

# ------------------------------------------------------------------------------------------------
# pretrain


def cmd_pretrain(args: argparse.Namespace, overrides: list[str]) -> int:
    from scratchlm.config import Config
    from scratchlm.train.pretrain import run_pretraining

    summary = run_stage(run_pretraining, stage_config(Config, args, overrides, {}), args)
    if not summary:
        return 0
    val = summary.get("val")
    shown = f"val loss {val['loss']:.3f}, bits/byte {val['bpb']:.3f}" if val else \
        "no validation data"
    print(f"done: {summary['steps']} steps, {summary['tokens']:,} tokens in "
          f"{summary['seconds']:.0f} s; {shown}; {summary['tokens_per_s']:,.0f} tokens/s, "
          f"MFU {summary['mfu']:.1%}; final model in {Path(args.out) / 'final'}")
    return 0

# ------------------------------------------------------------------------------------------------
# model: generate, chat, convert, memory


def load_for_generation(path: str, tokenizer_dir: str | None, quantize: str | None = None):
    """The model (quantized when asked), tokenizer and model directory of a run, model or
    Hugging Face directory."""
    import torch

    from scratchlm.generate import check_half_precision
    from scratchlm.model.load import load_pretrained

    device = "cuda" if torch.cuda.is_available() else "cpu"
    check_half_precision(quantize, device)
    model, tok, model_dir = load_pretrained(path, device, tokenizer_dir)
    if quantize:
        from scratchlm.quantize import quantize as quantize_model

        quantize_model(model, quantize)
    return model, tok, model_dir


def sampling_kwargs(args: argparse.Namespace) -> dict:
    return dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                seed=args.seed, use_kv_cache=not args.no_cache,
                sliding_window=args.sliding_window)


def check_sampling_flags(args: argparse.Namespace, n: int = 1) -> None:
    """The sampling flags, checked before the model loads and before anything is printed (a
    bad value otherwise surfaces mid-line, after the prompt); the rules are the library's,
    `scratchlm.generate.check_sampling`, reported under the flag's name."""
    from scratchlm.generate import SamplingError, check_sampling, check_stop

    try:
        check_sampling(args.temperature, args.top_k, args.top_p, args.max_new_tokens, args.seed,
                       n)
        check_stop(getattr(args, "stop", []))
    except SamplingError as e:
        raise ScratchError(f"--{e.option.replace('_', '-')} {e.problem}") from None


def cmd_generate(args: argparse.Namespace, _: list[str]) -> int:
    from scratchlm.generate import check_context, encode_prompt, stream_text

    if args.num_samples < 1:
        raise ScratchError(f"--num-samples must be >= 1, got {args.num_samples}")
    check_sampling_flags(args, args.num_samples)
    model, tok, _ = load_for_generation(args.model, args.tokenizer, args.quantize)
    check_context(len(encode_prompt(tok, args.prompt)), args.max_new_tokens,
                  model.config.block_size, args.sliding_window,
                  fix="shorten the prompt, lower --max-new-tokens or pass --sliding-window")
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
    from scratchlm.generate import CHAT_STOP, chat_prompt, stream_text, template_chat_ids
    from scratchlm.templates import load_template

    check_sampling_flags(args)
    model, tok, model_dir = load_for_generation(args.model, args.tokenizer, args.quantize)
    template = load_template(model_dir)
    history: list[tuple[str, str]] = []
    room = model.config.block_size - args.max_new_tokens
    if room < 1:  # every message needs a token of the context besides the reply
        raise ScratchError(f"--max-new-tokens {args.max_new_tokens} leaves no room for a "
                           f"message in the model's context of {model.config.block_size}; "
                           f"lower it below {model.config.block_size}")
    how = f"the model's {template.name} template" if template else "a plain transcript"
    print(f"chat ({how}): type a message and press enter; an empty line or Ctrl-D ends",
          flush=True)
    while True:
        try:
            message = input("> ").strip()
        except EOFError:
            break
        if not message:
            break
        if template is not None:  # stop at the end-of-turn token the model was tuned with
            prompt = template_chat_ids(template, tok, history, message, room)
            options = dict(stop_tokens=template.stop_ids(tok))
        else:
            prompt = chat_prompt(history, message, room, tok)
            options = dict(stop=CHAT_STOP)
        reply = ""
        for piece in stream_text(model, tok, prompt, args.max_new_tokens, **options,
                                 **sampling_kwargs(args)):
            reply += piece
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        history.append((message, reply.strip()))
    return 0


def cmd_serve(args: argparse.Namespace, _: list[str]) -> int:
    import os

    from scratchlm.serve import bind, build_app, run

    api_key = args.api_key or os.environ.get("SCRATCHLM_API_KEY") or None
    sock = bind(args.host, args.port)  # a bad or busy port fails now, not after the load
    try:
        app = build_app(args.model, args.tokenizer, args.quantize, api_key, args.max_batch,
                        args.max_pending, args.model_name, use_kv_cache=not args.no_cache)
    except BaseException:
        sock.close()
        raise
    s = app.state.served
    port = sock.getsockname()[1]  # the one the OS picked for --port 0
    host = f"[{args.host}]" if ":" in args.host else args.host
    if args.host not in ("127.0.0.1", "localhost", "::1") and api_key is None:
        print(f"warning: serving on {args.host} with no API key: anyone who can reach it may "
              "use it (pass --api-key)", file=sys.stderr)
    print(f"serving {s.model_name} ({s.label}, context {s.block}, "
          f"{'template ' + s.template.name if s.template else 'no chat template'}) at "
          f"http://{host}:{port}: OpenAI API under /v1, chat page at /", flush=True)
    run(app, log_level=args.log_level, sock=sock)
    return 0


def cmd_convert(args: argparse.Namespace, _: list[str]) -> int:
    from scratchlm.model.convert import from_hf_dir, to_hf_dir

    if bool(args.from_hf) == bool(args.to_hf):
        raise ScratchError("give exactly one of --from-hf DIR or --to-hf MODEL")
    convert = from_hf_dir if args.from_hf else to_hf_dir
    print(convert(args.from_hf or args.to_hf, args.out, args.tokenizer, args.overwrite))
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
                          args.tp, args.pp, args.lora_rank, args.lora_targets)
    split = f", tp {args.tp} x pp {args.pp} ({est.params / 1e9:.3f}B per device)" \
        if args.tp * args.pp > 1 else ""
    if args.lora_rank:
        from scratchlm.memory import lora_params

        trained = lora_params(cfg, args.lora_rank, args.lora_targets)
        split += (f", LoRA rank {args.lora_rank} on {'+'.join(args.lora_targets)}: "
                  f"{trained / 1e6:.2f}M trainable ({trained / count_params(cfg):.2%})")
    print(f"{args.preset}: {count_params(cfg) / 1e9:.3f}B parameters, {args.dtype}, "
          f"{args.optimizer}, ZeRO-{args.zero} over {args.gpus} data-parallel device(s){split}, "
          f"micro-batch {args.micro_batch} x "
          f"{args.seq or cfg.block_size} tokens"
          f"{', activation checkpointing' if args.activation_checkpointing else ''}")
    print("per device:")
    print(est.table())
    return 0


# ------------------------------------------------------------------------------------------------
# fine-tuning


def stage_config(cls: type, args: argparse.Namespace, overrides: list[str],
                 flags: dict[str, str]):
    """A stage's config: the recipe (--config), then its flags (--model DIR is
    --SECTION.model=DIR, ...), then --section.key=value overrides."""
    from scratchlm.config import load_config

    given = [f"--{key}={getattr(args, flag)}" for flag, key in flags.items()
             if getattr(args, flag, None) is not None]
    return load_config(cls, resolve_recipe(args.config), given + overrides)


def run_stage(run, cfg, args: argparse.Namespace) -> dict:
    """A training stage in the run directory --out, under torchrun or not."""
    from scratchlm.parallel import barrier, is_main, teardown

    try:
        summary = run(cfg, Path(args.out), resume=args.resume, progress=not args.quiet)
        barrier()  # no rank leaves the group while another still talks to it
    finally:
        main_rank = is_main()
        teardown()
    return summary if main_rank else {}


def cmd_finetune_classify(args: argparse.Namespace, overrides: list[str]) -> int:
    from scratchlm.config import ClassifyConfig
    from scratchlm.finetune.classify import run_classify

    cfg = stage_config(ClassifyConfig, args, overrides, {
        "model": "classify.model", "tokenizer": "classify.tokenizer", "data": "classify.data",
        "train": "classify.train_file", "val": "classify.val_file",
        "test": "classify.test_file"})
    summary = run_stage(run_classify, cfg, args)
    for split, m in summary.get("metrics", {}).items():
        print(f"{split}: accuracy {m['accuracy']:.2%}, macro-F1 {m['macro_f1']:.3f}, "
              f"loss {m['loss']:.3f}")
    if summary:
        print(f"classifier in {Path(args.out) / 'final'}; metrics in "
              f"{Path(args.out) / 'metrics.json'}")
    return 0


def cmd_finetune_sft(args: argparse.Namespace, overrides: list[str]) -> int:
    from scratchlm.config import SFTConfig
    from scratchlm.finetune.sft import run_sft

    cfg = stage_config(SFTConfig, args, overrides, {
        "model": "sft.model", "tokenizer": "sft.tokenizer", "data": "sft.data",
        "val_data": "sft.val_data", "template": "sft.template"})
    summary = run_stage(run_sft, cfg, args)
    if not summary:
        return 0
    val, test = summary.get("val", {}), summary.get("test", {})
    if val:
        print(f"validation: loss {val['loss']:.3f} per response token")
    if test:
        print(f"test: exact match {test['exact_match']:.1%}, token F1 {test['token_f1']:.3f}, "
              f"ROUGE-L {test['rouge_l']:.3f}")
    print(f"model in {Path(args.out) / 'final'}; answers in "
          f"{Path(args.out) / 'responses.jsonl'}")
    return 0


# ------------------------------------------------------------------------------------------------
# alignment


def cmd_align_reward(args: argparse.Namespace, overrides: list[str]) -> int:
    from scratchlm.align.reward import run_reward
    from scratchlm.config import RewardConfig

    cfg = stage_config(RewardConfig, args, overrides, {
        "model": "reward.model", "tokenizer": "reward.tokenizer", "data": "reward.data",
        "template": "reward.template"})
    summary = run_stage(run_reward, cfg, args)
    for split, m in summary.get("metrics", {}).items():
        print(f"{split}: pairwise accuracy {m['accuracy']:.1%}, margin {m['margin']:.3f}, "
              f"loss {m['loss']:.3f} ({m['pairs']} pairs)")
    if summary:
        print(f"reward model in {Path(args.out) / 'final'} (use it with --reward-model; "
              f"`scratchlm convert --to-hf` exports it)")
    return 0


def cmd_align_dpo(args: argparse.Namespace, overrides: list[str]) -> int:
    from scratchlm.align.dpo import run_dpo
    from scratchlm.config import DPOConfig

    cfg = stage_config(DPOConfig, args, overrides, {
        "model": "dpo.model", "tokenizer": "dpo.tokenizer", "data": "dpo.data",
        "template": "dpo.template", "ref_model": "dpo.ref_model"})
    summary = run_stage(run_dpo, cfg, args)
    if not summary:
        return 0
    held = summary["held_out"]
    for when in ("before", "after"):
        m = held[when]
        print(f"held-out {when}: rewards/accuracies {m['rewards/accuracies']:.1%}, "
              f"rewards/margins {m['rewards/margins']:.3f}, policy prefers chosen "
              f"{m['logps/accuracies']:.1%} ({held['pairs']} pairs)")
    print(f"policy in {Path(args.out) / 'final'}; answers before and after in "
          f"{Path(args.out) / 'responses.md'}")
    return 0


def print_rl_summary(summary: dict, out: str) -> None:
    held = summary["held_out"]
    for when in ("before", "after"):
        m = held[when]
        print(f"held-out ({held['split']}) {when}: reward {m['reward']:.3f}, KL to the "
              f"reference {m['kl']:.3f} nats, {m['length']:.1f} tokens")
    print(f"policy in {Path(out) / 'final'}; curves in {Path(out) / 'rl.png'}")


def cmd_align_ppo(args: argparse.Namespace, overrides: list[str]) -> int:
    from scratchlm.align.ppo import run_ppo
    from scratchlm.config import PPOConfig

    cfg = stage_config(PPOConfig, args, overrides, {
        "model": "ppo.model", "tokenizer": "ppo.tokenizer", "data": "ppo.data",
        "template": "ppo.template", "ref_model": "ppo.ref_model",
        "reward_model": "ppo.reward_model", "reward": "ppo.reward"})
    summary = run_stage(run_ppo, cfg, args)
    if summary:
        print_rl_summary(summary, args.out)
    return 0


def cmd_align_grpo(args: argparse.Namespace, overrides: list[str]) -> int:
    from scratchlm.align.grpo import run_grpo
    from scratchlm.config import GRPOConfig

    cfg = stage_config(GRPOConfig, args, overrides, {
        "model": "grpo.model", "tokenizer": "grpo.tokenizer", "data": "grpo.data",
        "template": "grpo.template", "ref_model": "grpo.ref_model",
        "reward_model": "grpo.reward_model", "reward": "grpo.reward"})
    summary = run_stage(run_grpo, cfg, args)
    if summary:
        print_rl_summary(summary, args.out)
    return 0


def add_align(verbs) -> None:
    """`scratchlm align reward|dpo|ppo|grpo`."""
    from scratchlm.config import DPOConfig, GRPOConfig, PPOConfig, RewardConfig

    align = verbs.add_parser("align", help="alignment: reward model, DPO, PPO, GRPO")
    stages = align.add_subparsers(dest="action", metavar="STAGE", required=True)
    pairs = ("Data: JSON/JSONL preference pairs ({prompt, chosen, rejected}, chat messages, or "
             "Alpaca {instruction, input, chosen, rejected}) or builtin:continue, "
             "builtin:speaker.")
    prompts = ("Prompts: JSONL {prompt} or {messages}, a preference or Alpaca file, or "
               "builtin:continue, builtin:speaker, builtin:genre. The reward: --reward-model "
               "DIR (from `align reward`) or --reward module:function | file.py:function "
               "(fn(prompt, response) -> float) | builtin:thou | builtin:verse.")
    specs = [
        ("reward", cmd_align_reward, RewardConfig, ("reward", "train", "parallel"),
         "a reward model: a scalar head, Bradley-Terry loss on preference pairs",
         "Trains a reward model on an SFT model. " + pairs),
        ("dpo", cmd_align_dpo, DPOConfig, ("dpo", "train", "parallel"),
         "direct preference optimisation (sigmoid or IPO loss)",
         "Trains a policy on preference pairs against a reference model. " + pairs),
        ("ppo", cmd_align_ppo, PPOConfig, ("ppo", "rollout", "train", "parallel"),
         "RLHF with PPO: rollouts, value head, GAE, KL penalty",
         "Trains a policy with PPO on rollouts of itself. " + prompts),
        ("grpo", cmd_align_grpo, GRPOConfig, ("grpo", "rollout", "train", "parallel"),
         "GRPO: group-relative advantages, no value head",
         "Trains a policy with GRPO on groups of its own responses. " + prompts),
    ]
    for name, func, cls, sections, short, description in specs:
        p = stages.add_parser(name, help=short, description=description,
                              formatter_class=argparse.RawDescriptionHelpFormatter,
                              epilog=config_keys(cls, *sections))
        add_model_flag(p)
        p.add_argument("--tokenizer", default=None, metavar="DIR",
                       help="tokenizer directory, if not saved beside the model")
        p.add_argument("--data", default=None, metavar="FILE|builtin:NAME",
                       help="preference pairs" if name in ("reward", "dpo") else "prompts")
        p.add_argument("--template", default=None, choices=["alpaca", "chat"],
                       help="prompt template (default: the model's own, else alpaca)")
        if name != "reward":
            p.add_argument("--ref-model", dest="ref_model", default=None, metavar="DIR",
                           help="the reference model (default: the starting model)")
        if name in ("ppo", "grpo"):
            p.add_argument("--reward-model", dest="reward_model", default=None, metavar="DIR",
                           help="a reward model trained by `scratchlm align reward`")
            p.add_argument("--reward", default=None, metavar="MODULE:FUNCTION",
                           help="a reward function, or builtin:thou / builtin:verse")
        add_run_flags(p)
        p.set_defaults(func=func, accepts_overrides=True)


def cmd_classify(args: argparse.Namespace, _: list[str]) -> int:
    from scratchlm.finetune.classify import Classifier

    texts = args.text or [line for line in read_stdin_text("strict").splitlines()
                          if line.strip()]
    if not texts:
        raise ScratchError("nothing to classify: give texts as arguments or lines on stdin")
    for text, (label, prob) in zip(texts, Classifier(args.model).predict(texts)):
        print(f"{label}\t{prob:.4f}\t{text}")
    return 0


# ------------------------------------------------------------------------------------------------
# evaluate, scaling laws


def cmd_evaluate(args: argparse.Namespace, _: list[str]) -> int:
    from scratchlm.eval.tasks import resolve_tasks

    tasks = resolve_tasks(args.tasks)  # a bad task file fails here, before a model loads
    if args.export_lm_eval:
        from scratchlm.eval.harness import export_lm_eval_tasks
        from scratchlm.utils import check_output_dir

        check_output_dir(args.export_lm_eval, args.overwrite)
        names = ",".join(p.stem for p in export_lm_eval_tasks(tasks, args.export_lm_eval))
        print(f"wrote lm-eval tasks {names} to {args.export_lm_eval}; run them with\n"
              f"  lm_eval --model hf --model_args pretrained=HF_DIR,dtype=float32 --tasks "
              f"{names} --include_path {args.export_lm_eval}\n"
              f"  python -m scratchlm.eval run --model scratchlm --model_args path=MODEL_DIR "
              f"--tasks {names} --include_path {args.export_lm_eval}")
        return 0
    if not args.model or not args.out:
        raise ScratchError("give --model DIR and --out results.json (or --export-lm-eval DIR)")
    out = Path(args.out)
    if out.suffix.lower() != ".json":
        raise ScratchError(f"--out {out} must name a .json file (the table goes beside it, "
                           "as .md)")
    for path in (out, out.with_suffix(".md")):
        if path.exists() and not args.overwrite:
            raise ScratchError(f"{path} already exists; choose another --out or pass "
                               "--overwrite")
    import torch

    from scratchlm.eval.builtin import held_out_warning
    from scratchlm.eval.evaluate import evaluate_tasks, results_table, write_results
    from scratchlm.model.load import load_pretrained

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, tok, directory = load_pretrained(args.model, device, args.tokenizer)
    warning = held_out_warning(directory) \
        if any(t.name.startswith("builtin:") for t in tasks) else None
    if warning:
        print(f"warning: {warning}", file=sys.stderr)
    results = evaluate_tasks(
        model, tok, tasks, shots=args.shots, limit=args.limit, batch_size=args.batch_size,
        seed=args.seed, log_samples=args.log_samples, model_path=str(args.model),
        progress=None if args.quiet else lambda line: print(line, file=sys.stderr))
    if warning:
        results["warnings"] = [warning]
    json_path, table_path = write_results(results, out)
    print(results_table(results))
    print(f"wrote {json_path} and {table_path}")
    return 0


def cmd_scaling_sweep(args: argparse.Namespace, overrides: list[str]) -> int:
    from scratchlm.config import load_config
    from scratchlm.scaling.sweep import ScalingConfig, run_sweep

    given = [f"--sweep.{key}=[{value}]" for key, value in
             (("budgets", args.budgets), ("sizes", args.sizes)) if value]
    cfg = load_config(ScalingConfig, resolve_recipe(args.config), given + overrides)
    records = run_sweep(cfg, Path(args.out), progress=not args.quiet)
    print(f"sweep: {len(records)} runs in {args.out}; fit them with "
          f"`scratchlm scaling fit --sweep {args.out}`")
    return 0


def cmd_scaling_fit(args: argparse.Namespace, _: list[str]) -> int:
    from scratchlm.scaling.report import write_fit

    fit = write_fit(args.sweep, bootstrap=args.bootstrap, plots=not args.no_plots)
    out = Path(args.sweep) / "fit"
    print((out / "report.md").read_text(encoding="utf-8"))
    print(f"wrote {out}: fit.json, report.md"
          + "".join(f", {Path(p).name}" for p in fit.get("plots", [])))
    return 0


def cmd_scaling_plan(args: argparse.Namespace, _: list[str]) -> int:
    from scratchlm.scaling.report import format_plan, plan, read_fit

    fit = read_fit(args.sweep) if args.sweep else None
    print(format_plan(plan(args.budget, fit, args.law)))
    return 0


def add_evaluate_and_scaling(verbs) -> None:
    from scratchlm.scaling.sweep import ScalingConfig

    ev = verbs.add_parser(
        "evaluate", help="score a model on tasks: perplexity, multiple choice, generation",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Tasks (--tasks, comma-separated): builtin (all built-in tasks), "
                    "builtin:speaker, builtin:next_line, builtin:cloze, builtin:heldout; a "
                    "text file (.txt/.md: loss, perplexity, bits per byte); a JSONL file of "
                    'multiple-choice lines {"context", "choices", "gold"} (acc and acc_norm, '
                    'as lm-evaluation-harness defines them) or of generation lines '
                    '{"context", "answer" | "answers", "until"?, "max_new_tokens"?} (greedy; '
                    "exact match and token F1). Writes results.json and results.md.")
    ev.add_argument("--model", "--checkpoint", dest="model", metavar="DIR",
                    help="a run directory, a model directory or a Hugging Face directory")
    ev.add_argument("--tasks", required=True, metavar="T1,T2")
    ev.add_argument("--shots", type=int, default=0, metavar="K",
                    help="solved examples before each one (drawn with --seed)")
    ev.add_argument("--limit", type=int, default=None, metavar="N",
                    help="score only the first N examples of each task")
    ev.add_argument("--out", metavar="results.json")
    ev.add_argument("--tokenizer", default=None, metavar="DIR",
                    help="tokenizer directory, if not saved beside the model")
    ev.add_argument("--batch-size", type=int, default=16, metavar="B")
    ev.add_argument("--seed", type=int, default=1234,
                    help="few-shot draw seed (lm-eval's default, 1234)")
    ev.add_argument("--log-samples", action="store_true",
                    help="keep each example's log-likelihoods or output in the JSON")
    ev.add_argument("--export-lm-eval", metavar="DIR", default=None,
                    help="write the tasks as lm-eval task files (YAML + JSONL) and stop")
    ev.add_argument("--overwrite", action="store_true", help="replace existing output")
    ev.add_argument("--quiet", action="store_true", help="no progress lines")
    ev.set_defaults(func=cmd_evaluate)

    sc = verbs.add_parser("scaling", help="IsoFLOP sweeps, scaling-law fits, compute plans")
    sc_verbs = sc.add_subparsers(dest="action", metavar="ACTION", required=True)
    sweep = sc_verbs.add_parser(
        "sweep", help="train an IsoFLOP grid of models (resumable)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=config_keys(ScalingConfig, "sweep"),
        description="For each budget, each size that fits is pretrained for budget / "
                    "(FLOPs per token) tokens, a normal run in OUT/runs/; finished runs are "
                    "skipped when the sweep runs again. The base pretraining config comes from "
                    "--config (default: the scaling-cpu recipe) and --section.key=value.")
    sweep.add_argument("--out", required=True, metavar="DIR", help="the sweep directory")
    sweep.add_argument("--config", default="scaling-cpu", metavar="YAML",
                       help="the base pretraining config or recipe")
    sweep.add_argument("--budgets", default=None, metavar="C1,C2",
                       help="compute budgets in FLOPs (sweep.budgets)")
    sweep.add_argument("--sizes", default=None, metavar="LxW,...",
                       help="model sizes, e.g. 2x32,2x64 (sweep.sizes)")
    sweep.add_argument("--quiet", action="store_true", help="no progress bars")
    sweep.set_defaults(func=cmd_scaling_sweep, accepts_overrides=True)
    fit = sc_verbs.add_parser("fit", help="fit the laws to a sweep; report and plots")
    fit.add_argument("--sweep", required=True, metavar="DIR")
    fit.add_argument("--bootstrap", type=int, default=100, metavar="N",
                     help="resamples for the constants' intervals (0 = none)")
    fit.add_argument("--no-plots", action="store_true")
    fit.set_defaults(func=cmd_scaling_fit)
    pl = sc_verbs.add_parser("plan", help="the compute-optimal size and tokens for a budget")
    pl.add_argument("--budget", type=float, required=True, metavar="FLOPS")
    pl.add_argument("--sweep", default=None, metavar="DIR", help="a fitted sweep")
    pl.add_argument("--law", default=None, choices=["hoffmann", "epoch"],
                    help="published constants instead of a sweep's")
    pl.set_defaults(func=cmd_scaling_plan)


# ------------------------------------------------------------------------------------------------
# demo


def cmd_demo(args: argparse.Namespace, overrides: list[str]) -> int:
    from scratchlm.config import Config, load_config
    from scratchlm.demo import run_demo

    cfg = load_config(Config, resolve_recipe(args.config or "demo"), overrides)
    # --train.* reaches every stage the demo trains (a device, a precision, a step cap).
    train = [o for o in overrides if o.startswith("--train.")]
    report = run_demo(cfg, Path(args.out), progress=not args.quiet, train_overrides=train)
    print(f"demo finished; report: {report}")
    return 0


# ------------------------------------------------------------------------------------------------
# the parser


def config_keys(cls: type | None, *sections: str) -> str:
    """The config keys of these sections of a stage's config (default: pretraining's) with
    defaults and help (the fields' docstrings), for the --help of verbs that take
    --section.key=value overrides."""
    from scratchlm.config import Config, describe

    lines = ["config keys (override with --KEY=VALUE):"]
    for key, default, doc in describe(cls or Config):
        if key.split(".")[0] in sections:
            lines += [f"  --{key}={default}", f"      {doc}"] if doc else [f"  --{key}={default}"]
    return "\n".join(lines)


def add_model_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", "--checkpoint", dest="model", required=True, metavar="DIR",
                   help="a run directory, a model directory or a Hugging Face directory")


def add_overwrite_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--overwrite", action="store_true",
                   help="replace what --out already holds (refused otherwise)")


def add_run_flags(p: argparse.ArgumentParser) -> None:
    """What every training verb takes: the run directory, a recipe, resume, quiet."""
    p.add_argument("--out", required=True, metavar="DIR", help="the run directory")
    p.add_argument("--config", default=None, metavar="YAML",
                   help="a config file or a recipe name from configs/")
    p.add_argument("--resume", action="store_true",
                   help="continue from the newest good checkpoint in DIR")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    from scratchlm.config import ClassifyConfig, SFTConfig

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
    add_overwrite_flag(train)
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
    add_overwrite_flag(imp)
    imp.set_defaults(func=cmd_tokenizer_import_gpt2)

    exp = tok_verbs.add_parser("export-gpt2", help="write encoder.json + vocab.bpe")
    exp.add_argument("--tokenizer", required=True, metavar="DIR")
    exp.add_argument("--out", required=True, metavar="DIR")
    add_overwrite_flag(exp)
    exp.set_defaults(func=cmd_tokenizer_export_gpt2)

    data = verbs.add_parser("data", help="prepare training data: clean, dedup, tokenize, shard")
    data_verbs = data.add_subparsers(dest="action", metavar="ACTION", required=True)
    prep = data_verbs.add_parser(
        "prepare", help="raw text -> token shards + manifest.json",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=config_keys(None, "data"),
        description="Reads txt/jsonl/parquet (optionally .gz/.zst), cleans, filters, removes "
                    "exact and near duplicates, tokenizes in worker processes and writes "
                    "shards. Any data key can be overridden, e.g. "
                    "--data.filters.preset=books or --data.dedup.threshold=0.9. An interrupted "
                    "local run resumes; --engine ray runs on a Ray cluster.")
    prep.add_argument("--input", nargs="+", metavar="PATH", help="files, directories, globs")
    prep.add_argument("--builtin", action="store_true", help="the built-in Shakespeare corpus")
    prep.add_argument("--tokenizer", required=True, metavar="DIR")
    prep.add_argument("--out", required=True, metavar="DIR")
    prep.add_argument("--config", default=None, metavar="YAML")
    prep.add_argument("--quiet", action="store_true", help="no progress bar")
    prep.add_argument("--engine", choices=["local", "ray"], default="local",
                      help="local: worker processes on this machine; ray: tasks on a Ray "
                           "cluster (pip install 'scratchlm[cluster]')")
    prep.add_argument("--address", default=None, metavar="auto|HOST:PORT",
                      help="the Ray cluster to join (default: start one on this machine)")
    prep.set_defaults(func=cmd_data_prepare, accepts_overrides=True)

    pre = verbs.add_parser(
        "pretrain", help="train a model from scratch (tokenizer, data and model as configured)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=config_keys(None, "tokenizer", "data", "model", "train", "parallel"),
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
        add_model_flag(p)
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
        add_quantize_flag(p)

    def add_quantize_flag(p: argparse.ArgumentParser) -> None:
        p.add_argument("--quantize", choices=["int8", "bf16", "fp16"], default=None,
                       help="int8: weight-only int8 with per-channel scales (CPU or GPU); "
                            "bf16/fp16: half-precision weights (GPU)")

    gen = verbs.add_parser("generate", help="sample text from a checkpoint")
    add_sampling(gen)
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--stop", nargs="*", default=[], metavar="STR", type=unescape,
                     help="stop before any of these strings (\\n, \\t and \\\\ are read as "
                          "a newline, a tab and a backslash)")
    gen.add_argument("--num-samples", type=int, default=1, metavar="N")
    gen.set_defaults(func=cmd_generate)

    chat = verbs.add_parser("chat", help="an interactive chat loop with streaming output")
    add_sampling(chat)
    chat.set_defaults(func=cmd_chat)

    srv = verbs.add_parser(
        "serve", help="an OpenAI-compatible server with a chat page",
        description="Serves a model over the OpenAI API (/v1/models, /v1/completions, "
                    "/v1/chat/completions, streaming) with continuous batching, plus the "
                    "tokenizer endpoints lm-evaluation-harness uses and a chat page at /.")
    add_model_flag(srv)
    srv.add_argument("--tokenizer", default=None, metavar="DIR",
                     help="tokenizer directory, if not saved beside the model")
    srv.add_argument("--host", default="127.0.0.1", help="address to listen on (loopback)")
    srv.add_argument("--port", type=int, default=8000, help="0: any free port")
    srv.add_argument("--api-key", default=None, metavar="KEY",
                     help="require `Authorization: Bearer KEY` (default: $SCRATCHLM_API_KEY)")
    add_quantize_flag(srv)
    srv.add_argument("--model-name", default=None, metavar="NAME",
                     help="the model's id in the API (default: the run's or directory's name)")
    srv.add_argument("--max-batch", type=int, default=16, metavar="N",
                     help="sequences decoded together (1 = no batching)")
    srv.add_argument("--max-pending", type=int, default=64, metavar="N",
                     help="sequences running or waiting; beyond, requests get 429")
    srv.add_argument("--no-cache", action="store_true",
                     help="recompute every sequence each step (no KV cache)")
    srv.add_argument("--log-level", default="info",
                     choices=["critical", "error", "warning", "info", "debug"])
    srv.set_defaults(func=cmd_serve)

    conv = verbs.add_parser("convert", help="Hugging Face transformers <-> scratchlm")
    conv.add_argument("--from-hf", metavar="DIR", help="a GPT-2 / Llama save_pretrained dir")
    conv.add_argument("--to-hf", metavar="MODEL", help="a scratchlm model or run directory (a "
                      "classifier becomes a ...ForSequenceClassification)")
    conv.add_argument("--tokenizer", default=None, metavar="DIR",
                      help="tokenizer directory, if not saved beside the model")
    conv.add_argument("--out", required=True, metavar="DIR")
    add_overwrite_flag(conv)
    conv.set_defaults(func=cmd_convert)

    fine = verbs.add_parser("finetune", help="fine-tune a trained model on a task")
    fine_verbs = fine.add_subparsers(dest="action", metavar="TASK", required=True)
    clf = fine_verbs.add_parser(
        "classify", help="text classification with a head on a pretrained model",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=config_keys(ClassifyConfig, "classify", "train", "parallel"),
        description="Fine-tunes a model (a run, a model directory or a Hugging Face "
                    "directory) to classify texts: a head at the last real token. Data: one "
                    "TSV/CSV/JSONL/parquet file split by classify.split (--data), three files "
                    "(--train/--val/--test), or --data builtin:genre.")
    add_model_flag(clf)
    clf.add_argument("--tokenizer", default=None, metavar="DIR",
                     help="tokenizer directory, if not saved beside the model")
    clf.add_argument("--data", default=None, metavar="FILE",
                     help="one labelled file to split, or builtin:genre")
    clf.add_argument("--train", default=None, metavar="FILE")
    clf.add_argument("--val", default=None, metavar="FILE")
    clf.add_argument("--test", default=None, metavar="FILE")
    add_run_flags(clf)
    clf.set_defaults(func=cmd_finetune_classify, accepts_overrides=True)

    sft = fine_verbs.add_parser(
        "sft", help="instruction fine-tuning with a prompt template (LoRA optional)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=config_keys(SFTConfig, "sft", "lora", "train", "parallel"),
        description="Supervised fine-tuning on instructions or conversations: Alpaca "
                    "JSON/JSONL, chat JSONL ({\"messages\": [...]}), or a built-in task "
                    "(builtin:speaker, builtin:continue, builtin:genre). The loss is on the "
                    "responses only unless --sft.train_on_prompt=true; --lora.rank=8 trains "
                    "LoRA adapters instead of every weight.")
    add_model_flag(sft)
    sft.add_argument("--tokenizer", default=None, metavar="DIR",
                     help="tokenizer directory, if not saved beside the model")
    sft.add_argument("--data", default=None, metavar="FILE",
                     help="instruction data (JSON/JSONL) or builtin:TASK")
    sft.add_argument("--val-data", dest="val_data", default=None, metavar="FILE",
                     help="a separate validation file")
    sft.add_argument("--template", default=None, choices=["alpaca", "chat"],
                     help="prompt template (default: alpaca)")
    add_run_flags(sft)
    sft.set_defaults(func=cmd_finetune_sft, accepts_overrides=True)
    add_align(verbs)

    cls = verbs.add_parser("classify", help="label texts with a fine-tuned classifier")
    add_model_flag(cls)
    cls.add_argument("text", nargs="*", help="texts to classify (default: lines on stdin)")
    cls.set_defaults(func=cmd_classify)

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
    mem.add_argument("--lora-rank", type=int, default=0, metavar="R",
                     help="LoRA adapters of rank R: only they train (0 = full training)")
    mem.add_argument("--lora-targets", nargs="+", default=["attn"], metavar="T",
                     choices=["attn", "q", "k", "v", "o", "mlp", "head"],
                     help="layers with adapters (default: attn)")
    mem.set_defaults(func=cmd_memory, accepts_overrides=True)

    add_evaluate_and_scaling(verbs)

    demo = verbs.add_parser(
        "demo", help="the whole pipeline on the built-in corpus",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=config_keys(None, "tokenizer", "data", "model", "train"),
        description="Runs every stage that has landed on the built-in Shakespeare corpus; any "
                    "config key can be overridden with --section.key=value.")
    demo.add_argument("--out", default="runs/demo", metavar="DIR")
    demo.add_argument("--config", default=None, metavar="YAML",
                      help="a config file or recipe name (default: configs/demo.yaml)")
    demo.add_argument("--quiet", action="store_true", help="no progress bars")
    demo.set_defaults(func=cmd_demo, accepts_overrides=True)
    return parser


def os_error(e: OSError) -> str:
    """One line for a refusal from the file system, with what to do about it."""
    where = f"{e.filename}: " if e.filename else ""
    fix = {errno.EACCES: "check the directory's permissions or choose another --out",
           errno.EROFS: "the file system is read-only; choose another --out",
           errno.ENOSPC: "the disk is full; free space, then run the same command again (an "
                         "interrupted run resumes with --resume)",
           errno.EDQUOT: "the disk quota is used up; free space and run it again",
           errno.EFBIG: "a file outgrew the size limit (ulimit -f) or the disk; free space or "
                        "raise the limit, then run the same command again (with --resume for "
                        "a training run)",
           errno.ENOTDIR: "a path component is a file, not a directory",
           errno.EISDIR: "a directory was given where a file is expected"}.get(
        e.errno, "check the path")
    return f"{where}{e.strerror or e}; {fix}"


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"warning: {message}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    overrides = [a for a in extra if a.startswith("--") and "." in a.split("=", 1)[0]]
    unknown = [a for a in extra if a not in overrides]
    if unknown or (overrides and not getattr(args, "accepts_overrides", False)):
        parser.error(f"unrecognized arguments: {' '.join(unknown or overrides)}")
    warnings.showwarning = _show_warning
    try:
        return args.func(args, overrides)
    except ScratchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # the file system refused: permissions, a full disk, a file as a dir
        print(f"error: {os_error(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
