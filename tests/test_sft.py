"""Instruction fine-tuning: templates (against the book's format and transformers'
apply_chat_template), collation, data formats, training, bad input."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import transformers

from scratchlm.cli import main
from scratchlm.config import SFTConfig, SFTSection, load_config
from scratchlm.errors import ScratchError
from scratchlm.finetune.sft import (
    collate,
    conversation_splits,
    encode_examples,
    pack,
    read_conversations,
    run_sft,
)
from scratchlm.model.logprobs import IGNORE
from scratchlm.model.resize import add_special_tokens
from scratchlm.templates import ALPACA_PREAMBLE, alpaca_messages, get_template, load_template
from scratchlm.tokenizer import BPETokenizer

transformers.logging.set_verbosity_error()

CHATS = [
    [{"role": "system", "content": "You answer briefly."},
     {"role": "user", "content": "Who wrote Hamlet?"},
     {"role": "assistant", "content": "Shakespeare."},
     {"role": "user", "content": "And <|user|> Macbeth? 😀"},
     {"role": "assistant", "content": " The same man,\n  twice."}],
    [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "hi"}],
]


def instructions(shared_data: Path) -> Path:
    return shared_data / "instruct" / "instruction-data.json"


@pytest.fixture(scope="module")
def chat_tok(tiny_run: Path) -> BPETokenizer:
    """The tiny run's tokenizer with the chat template's tokens added."""
    from scratchlm.model.checkpoint import load_model

    model = load_model(tiny_run / "final")
    _, tok, added = add_special_tokens(model, BPETokenizer.load(tiny_run / "final"),
                                       list(get_template("chat").special_tokens))
    assert added == ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
    return tok


def test_alpaca_prompt_is_the_books(shared_data: Path) -> None:
    records = json.loads(instructions(shared_data).read_text())
    with_input = next(r for r in records if r["input"])
    book = (f"{ALPACA_PREAMBLE}\n\n### Instruction:\n{with_input['instruction']}"
            f"\n\n### Input:\n{with_input['input']}\n\n### Response:\n{with_input['output']}"
            "<|endoftext|>")
    messages = alpaca_messages(with_input["instruction"], with_input["input"],
                               with_input["output"])
    assert get_template("alpaca").render(messages) == book
    prompt = get_template("alpaca").render(messages[:1], add_generation_prompt=True)
    assert prompt == book[:book.index("### Response:\n") + len("### Response:\n")]


def test_encoding_equals_the_whole_string_and_masks_the_responses(
        shared_data: Path, tiny_run: Path, chat_tok: BPETokenizer) -> None:
    tok = BPETokenizer.load(tiny_run / "final")
    convs = read_conversations(str(instructions(shared_data)))
    for name, tokenizer, cases in [("alpaca", tok, convs), ("chat", chat_tok, convs + CHATS)]:
        template = get_template(name)
        for conv in cases:
            ids, mask = template.encode(tokenizer, conv)
            text = template.render(conv)
            if "<|user|>" in text.replace("<|user|>\n", ""):  # a special string in content
                user = tokenizer.special_tokens["<|user|>"]
                assert ids.count(user) == sum(m["role"] == "user" for m in conv)
            else:
                assert ids == tokenizer.encode(text, allowed_special="all"), (name, text[:80])
            trained = tokenizer.decode([t for t, m in zip(ids, mask) if m])
            replies = [m["content"] + template.end for m in conv if m["role"] == "assistant"]
            assert trained == "".join(replies)


@pytest.mark.parametrize("name", ["alpaca", "chat"])
def test_hf_apply_chat_template_gives_our_ids(name: str, tiny_run: Path, chat_tok,
                                              tmp_path: Path) -> None:
    from scratchlm.model.checkpoint import load_model
    from scratchlm.model.hf import save_hf

    tok = chat_tok if name == "chat" else BPETokenizer.load(tiny_run / "final")
    model = load_model(tiny_run / "final")
    model, tok, _ = add_special_tokens(model, tok, list(get_template(name).special_tokens))
    template = get_template(name)
    save_hf(model, tmp_path, tok, template=template)
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    # (transformers reads special-token strings inside content as special tokens; we never
    # do, so CHATS[0]'s "<|user|>" is left out here.)
    for conv in CHATS[1:] + [CHATS[0][:3], alpaca_messages("Name a play.", "", "Hamlet")]:
        for gen in (False, True):
            messages = conv[:-1] if gen else conv
            ours = template.encode(tok, messages, add_generation_prompt=gen)[0]
            theirs = hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=gen,
                                            return_dict=False)
            assert list(theirs) == ours, (name, gen)


def test_collation_masks_pads_cuts_and_packs(tiny_run: Path) -> None:
    tok = BPETokenizer.load(tiny_run / "final")
    template = get_template("alpaca")
    convs = [alpaca_messages("Say a word.", "", "Forsooth"),
             alpaca_messages("Count.", "", "one two three four five six seven eight " * 20)]
    short = len(template.encode(tok, convs[0])[0])
    cap = short + 10
    examples, stats = encode_examples(convs, template, tok, cap, "cut", False)
    assert stats == {"cut": 1, "dropped": 0} and len(examples[1].ids) == cap + 1
    batch = collate(examples, pad_id=tok.eot_id)
    assert batch["idx"].shape == (2, cap) and batch["targets"].shape == (2, cap)
    first = examples[0]
    n = len(first.ids) - 1
    assert torch.all(batch["idx"][0, n:] == tok.eot_id)  # right padding
    assert torch.all(batch["targets"][0, n:] == IGNORE)
    trained = [t for t in batch["targets"][0].tolist() if t != IGNORE]
    assert tok.decode(trained) == "Forsooth<|endoftext|>"
    everything, _ = encode_examples(convs, template, tok, cap, "cut", True)
    assert sum(t != IGNORE for t in everything[0].labels) == len(everything[0].ids)
    dropped, stats = encode_examples(convs, template, tok, cap, "drop", False)
    assert len(dropped) == 1 and stats["dropped"] == 1
    with pytest.raises(ScratchError, match="example 2 is .* tokens, longer than max_length"):
        encode_examples(convs, template, tok, cap, "error", False)
    several = everything[:1] * 5
    packed = pack(several, 3 * short)
    assert len(packed) == 2 and all(len(e.ids) <= 3 * short + 1 for e in packed)
    assert [t for e in packed for t in e.ids] == [t for e in several for t in e.ids]


def test_formats_and_splits(shared_data: Path, tmp_path: Path) -> None:
    splits = conversation_splits(SFTSection(data=str(instructions(shared_data))))
    assert [len(splits[s]) for s in ("train", "val", "test")] == [935, 55, 110]
    chat = tmp_path / "chat.jsonl"
    chat.write_text("".join(json.dumps({"messages": c}) + "\n" for c in CHATS * 10))
    splits = conversation_splits(SFTSection(data=str(chat)))
    assert sum(len(s) for s in splits.values()) == 20
    task = conversation_splits(SFTSection(data="builtin:speaker"))
    assert len(task["train"]) > 500 and task["test"][0][-1]["role"] == "assistant"


BAD = [
    ({"instruction": "x", "input": ""}, "Alpaca record without 'output'"),
    ({"messages": []}, "'messages' is empty"),
    ({"messages": [{"role": "narrator", "content": "x"}]}, "has role 'narrator'"),
]


@pytest.mark.parametrize("record, message", BAD)
def test_bad_records_are_one_line(record: dict, message: str, tiny_run: Path, tmp_path: Path,
                                  capsys) -> None:
    data = tmp_path / "d.jsonl"
    good = {"instruction": "Say hi.", "input": "", "output": "hi"}
    data.write_text("".join(json.dumps(r) + "\n" for r in [good, good, record, good]))
    code = main(["finetune", "sft", "--model", str(tiny_run), "--data", str(data), "--out",
                 str(tmp_path / "out"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert message in err and "record 3" in err
    assert not (tmp_path / "out").exists()


def test_a_lora_target_that_names_no_module_is_refused(tiny_run: Path, tmp_path: Path,
                                                        capsys) -> None:
    args = ["finetune", "sft", "--model", str(tiny_run), "--data", "builtin:genre", "--out",
            str(tmp_path / "out"), "--quiet", "--lora.rank=4"]
    assert main(args + ["--lora.targets=[attn, ffn]"]) == 2
    assert "lora.targets: 'ffn' names no layer" in capsys.readouterr().err
    assert main(args + ["--lora.targets=[head]"]) == 2  # tiny-cpu ties its head
    assert "the head is tied to the embedding" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def sft_cfg(base: Path, *overrides: str) -> SFTConfig:
    return load_config(SFTConfig, None, [
        f"--sft.model={base}", "--train.max_steps=30", "--train.epochs=0", "--train.lr=2e-3",
        "--train.micro_batch=8", "--train.eval_every=15", "--sft.eval_examples=10",
        "--sft.max_new_tokens=8", *overrides])


def test_sft_learns_the_task_and_writes_its_outputs(tiny_run: Path, tmp_path: Path) -> None:
    cfg = sft_cfg(tiny_run, "--sft.data=builtin:genre", "--sft.template=chat",
                  "--train.max_steps=60", "--train.lr=3e-3", "--train.eval_every=30")
    summary = run_sft(cfg, tmp_path, progress=False)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    vals = [r["val_loss"] for r in rows if "val_loss" in r]
    # The one-word answers are learnt: the validation loss falls (0.54-0.65 nats over six
    # seeds and both AdamW kernels) ...
    assert len(vals) == 2 and vals[-1] < vals[0] - 0.4
    final = tmp_path / "final"
    assert load_template(final).name == "chat"
    tok = BPETokenizer.load(final)
    assert "<|assistant|>" in tok.special_tokens
    answers = [json.loads(line) for line in (tmp_path / "responses.jsonl").read_text()
               .splitlines()]
    assert len(answers) == 10 and all({"response", "reference", "rouge_l"} <= set(a)
                                      for a in answers)
    # ... and so is the format: the turn ends after one lower-case word at most (the base
    # model answers with runs of commas). Which word a 0.26M-parameter model picks after 60
    # steps depends on the seed (and on float rounding), so that is not asserted.
    assert all(re.fullmatch("[a-z]*", a["response"]) for a in answers), answers
    assert summary["test"]["exact_match"] == pytest.approx(
        sum(a["exact_match"] for a in answers) / 10)
    from scratchlm.model.load import load_pretrained

    model, _, _ = load_pretrained(final)
    assert model.config.vocab_size == tok.vocab_size == 2048 + 4


def test_the_loss_counts_response_tokens_only(tiny_run: Path, tmp_path: Path) -> None:
    from scratchlm.finetune.sft import SFTObjective

    cfg = sft_cfg(tiny_run, "--sft.data=builtin:genre", "--train.max_steps=1")
    tok = BPETokenizer.load(tiny_run / "final")
    convs = conversation_splits(cfg.sft)["train"][:8]
    examples, _ = encode_examples(convs, get_template("alpaca"), tok, 512, "cut", False)
    objective = SFTObjective({"train": examples, "val": []}, [], tok, get_template("alpaca"),
                             cfg.sft, tok.eot_id, {})
    batch = objective.batches(8, 0, 0, 1).next_batch()
    answers = sum(len(tok.encode(c[-1]["content"], disallowed_special=())) + 1 for c in convs)
    assert objective.count(batch) == answers  # the reply's tokens and <|endoftext|>


def parity_args(tiny_run: Path, *extra: str) -> list[str]:
    return ["finetune", "sft", "--model", str(tiny_run), "--data", "builtin:continue",
            "--quiet", "--train.max_steps=6", "--train.epochs=0", "--train.micro_batch=4",
            "--train.global_batch=8", "--train.eval_every=3", "--train.checkpoint_every=3",
            "--train.lr=1e-3", "--sft.eval_examples=2", "--sft.max_new_tokens=4", *extra]


@pytest.mark.distributed
@pytest.mark.parametrize("zero, lora", [(0, False), (2, True)])
def test_ddp_and_zero2_equal_one_process(tiny_run: Path, tmp_path: Path, zero: int,
                                         lora: bool) -> None:
    """Two processes on the same global batch, DDP (full fine-tuning) or ZeRO-2 (LoRA): the
    loss of every step equals one process's (the count of response tokens differs from
    micro-batch to micro-batch, so only the global normalisation makes them agree)."""
    import subprocess

    from safetensors.torch import load_file

    from helpers import SCRATCHLM, losses, torchrun

    args = parity_args(tiny_run, *(["--lora.rank=4"] if lora else []))
    subprocess.run(SCRATCHLM + args + ["--out", str(tmp_path / "one")], check=True,
                   capture_output=True)
    torchrun(*args, "--out", str(tmp_path / "two"), "--parallel.dp=2",
             f"--parallel.zero={zero}")
    assert losses(tmp_path / "two") == pytest.approx(losses(tmp_path / "one"), abs=1e-5)
    name = "adapter.safetensors" if lora else "model.safetensors"
    a = load_file(str(tmp_path / "one" / "final" / name))
    b = load_file(str(tmp_path / "two" / "final" / name))
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=5e-4, rtol=1e-3)


@pytest.mark.slow
def test_sigkill_then_resume_equals_uninterrupted_run(tiny_run: Path, tmp_path: Path) -> None:
    from helpers import sigkill_then_resume

    sigkill_then_resume(parity_args(tiny_run, "--lora.rank=4"), tmp_path, 3,
                        ["model.safetensors", "adapter.safetensors"])


def test_sft_dropout_applies_to_training_only(tiny_run: Path, tmp_path: Path) -> None:
    """sft.dropout: the same first batch gives another training loss with dropout on, while
    evaluation (dropout off) before any update is the same."""
    first = {}
    for rate in ("none", "0.5"):
        extra = [] if rate == "none" else [f"--sft.dropout={rate}"]
        cfg = sft_cfg(tiny_run, "--sft.data=builtin:genre", "--sft.template=chat",
                      "--train.max_steps=1", "--train.lr=1e-12", "--train.eval_every=1",
                      "--sft.eval_examples=1", "--sft.max_new_tokens=1", *extra)
        run_sft(cfg, tmp_path / rate, progress=False)
        first[rate] = json.loads((tmp_path / rate / "metrics.jsonl").read_text().splitlines()[0])
    assert abs(first["0.5"]["loss"] - first["none"]["loss"]) > 1e-3
    assert first["0.5"]["val_loss"] == pytest.approx(first["none"]["val_loss"], abs=1e-6)


def test_lora_sft_trains_the_chat_tokens_rows(tiny_run: Path, tmp_path: Path, monkeypatch,
                                               capsys) -> None:
    """With LoRA, the chat template's new tokens' rows train (the base vocabulary's stay
    bitwise frozen), are counted as trained, save with the adapters, and the saved run (as
    loaded for chat, and exported for peft) gives the logits of the model in memory."""
    import peft
    from safetensors.torch import load_file

    from scratchlm.finetune import sft
    from scratchlm.model.checkpoint import load_model
    from scratchlm.model.convert import to_hf_dir
    from scratchlm.model.load import load_pretrained
    from scratchlm.model.lora import lora_layers

    kept = {}
    prepare = sft.prepare_model

    def keep(*args, **kwargs):
        kept["model"], tok, source = prepare(*args, **kwargs)
        kept["initial"] = kept["model"].tok_emb.weight.detach().clone()
        return kept["model"], tok, source

    monkeypatch.setattr(sft, "prepare_model", keep)
    cfg = sft_cfg(tiny_run, "--sft.data=builtin:genre", "--sft.template=chat",
                  "--train.max_steps=4", "--train.eval_every=0", "--sft.eval_examples=2",
                  "--lora.rank=4", "--lora.targets=[attn,mlp]")
    run_sft(cfg, tmp_path, progress=False)
    model, initial = kept["model"].eval(), kept["initial"]
    V, n, d = 2048, 4, model.config.n_embd
    adapters = sum(lora.a.numel() + lora.b.numel() for lora in lora_layers(model).values())
    assert f"training {adapters + n * d:,} of" in capsys.readouterr().out
    base = load_model(tiny_run / "final").tok_emb.weight
    assert torch.equal(model.tok_emb.weight[:V], base)  # the old rows, bitwise
    rows = model.token_rows.emb.detach()
    assert (rows - initial[V:]).abs().amax(1).gt(0).all()  # every new row moved ...
    assert (rows[:, None] - rows[None]).abs().sum(-1).add(torch.eye(n)).gt(0).all()  # apart
    final = tmp_path / "final"
    assert torch.equal(load_file(str(final / "adapter.safetensors"))["token_rows.emb"], rows)
    idx = torch.tensor([BPETokenizer.load(final).encode(
        "<|user|>Say hi.<|end|><|assistant|>hi<|end|>", allowed_special="all")])
    with torch.no_grad():
        ours = model(idx)[0]
        assert torch.equal(load_model(final).eval()(idx)[0], ours)
        chat = load_pretrained(final)[0]  # as `scratchlm chat` loads it: adapters baked in
        assert (chat(idx)[0] - ours).abs().max() <= 1e-5
    to_hf_dir(final, tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    wrapped = peft.PeftModel.from_pretrained(hf, tmp_path / "hf" / "adapter").eval()
    with torch.no_grad():
        assert (wrapped(idx).logits - ours).abs().max() <= 1e-4
