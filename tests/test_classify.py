"""Classification fine-tuning: data, the head, training, export to transformers, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers

from scratchlm.cli import main
from scratchlm.config import ClassifyConfig, ClassifySection, load_config
from scratchlm.errors import ScratchError
from scratchlm.finetune.classify import (
    Classifier,
    Example,
    class_logits,
    classification_metrics,
    collate,
    confusion_matrix,
    labelled_splits,
    lm_loss_per_example,
    new_head,
    pool,
    run_classify,
)
from scratchlm.model import GPT, ModelConfig
from scratchlm.model.hf import to_hf

transformers.logging.set_verbosity_error()


def sms(shared_data: Path) -> Path:
    return shared_data / "sms_spam" / "SMSSpamCollection"


def test_sms_collection_read_balanced_and_split_as_the_book_does(shared_data: Path) -> None:
    section = ClassifySection(data=str(sms(shared_data)), balance="undersample")
    splits = labelled_splits(section)
    every = [p for s in splits.values() for p in s]
    assert len(every) == 2 * 747  # as many ham as the 747 spam
    assert sum(label == "spam" for _, label in every) == 747
    assert [len(splits[s]) for s in ("train", "val", "test")] == [1045, 149, 300]
    texts = {t for t, _ in every}
    assert all(t.strip() for t in texts)
    again = labelled_splits(section)  # the seed fixes the split
    assert again == splits
    other = labelled_splits(ClassifySection(data=str(sms(shared_data)), balance="undersample",
                                            seed=7))
    assert other["test"] != splits["test"]
    unbalanced = labelled_splits(ClassifySection(data=str(sms(shared_data))))
    assert sum(len(s) for s in unbalanced.values()) == 5574


def test_jsonl_csv_and_parquet_with_named_fields(tmp_path: Path) -> None:
    rows = [{"body": f"text number {i}", "kind": "a" if i % 2 else "b"} for i in range(10)]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "d.csv").write_text("kind,body\n" + "".join(
        f'{r["kind"]},"{r["body"]}, quoted"\n' for r in rows))
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    for name in ("d.jsonl", "d.csv", "d.parquet"):
        section = ClassifySection(data=str(tmp_path / name), text_field="body",
                                  label_field="kind", split=[0.6, 0.2, 0.2])
        splits = labelled_splits(section)
        assert sum(len(s) for s in splits.values()) == 10
        if name == "d.csv":
            assert all(t.endswith(", quoted") for s in splits.values() for t, _ in s)


def test_genre_task_is_split_by_play() -> None:
    from scratchlm.data.tasks import play_splits

    splits = labelled_splits(ClassifySection(data="builtin:genre"))
    assert {label for _, label in splits["train"]} == {"comedy", "history", "tragedy"}
    assert {label for _, label in splits["test"]} == {"comedy", "history", "tragedy"}
    plays = play_splits(123)
    assert set(plays.values()) == {"train", "val", "test"}
    assert sum(len(s) for s in splits.values()) == 783


def test_padding_does_not_change_a_texts_logits() -> None:
    """The head reads each text's own last token (and mean, and max), whatever the padding
    after it; max pooling is each channel's largest state over the text's own tokens."""
    torch.manual_seed(0)
    model = GPT(ModelConfig.from_preset("gpt2-tiny")).eval()
    head = new_head(model, 3)
    examples = [Example(list(range(5, 5 + n)), 0) for n in (3, 9, 1, 6)]
    hidden = torch.randn(2, 5, 4)
    torch.testing.assert_close(pool(hidden, torch.tensor([2, 5]), "max"),
                               torch.stack([hidden[0, :2].amax(0), hidden[1].amax(0)]))
    for pooling in ("last", "mean", "max"):
        together = class_logits(model, head, collate(examples, pad_id=0), pooling)
        for i, e in enumerate(examples):
            alone = class_logits(model, head, collate([e], pad_id=0), pooling)
            torch.testing.assert_close(together[i], alone[0], atol=1e-5, rtol=1e-5)


def test_auxiliary_lm_loss_is_each_texts_own_mean_next_token_loss() -> None:
    """classify.lm_weight (GPT-1's auxiliary objective): each example's mean next-token loss
    over its own tokens, right padding excluded, as if scored alone; a 1-token text adds 0."""
    import torch.nn.functional as F

    torch.manual_seed(0)
    model = GPT(ModelConfig.from_preset("gpt2-tiny")).eval()
    examples = [Example(torch.randint(1, 512, (n,)).tolist(), 0) for n in (4, 11, 1, 7)]
    batch = collate(examples, pad_id=0)
    logits, _ = model(batch["idx"])
    ours = lm_loss_per_example(logits, batch["idx"], batch["lengths"])
    for i, e in enumerate(examples):
        ids = torch.tensor([e.ids])
        alone = (F.cross_entropy(model(ids)[0][0, :-1], ids[0, 1:]) if len(e.ids) > 1
                 else torch.tensor(0.0))
        torch.testing.assert_close(ours[i], alone, atol=1e-5, rtol=1e-5)


def test_metrics_against_sklearn_definitions() -> None:
    predicted, gold = [0, 0, 1, 1, 2, 0, 2, 2], [0, 1, 1, 1, 2, 2, 2, 0]
    m = classification_metrics(confusion_matrix(predicted, gold, 3), ["a", "b", "c"])
    assert m["accuracy"] == pytest.approx(5 / 8)
    # a: precision 1/3, recall 1/2; b: 2/2, 2/3; c: 2/3, 2/3 (written out by hand)
    f1 = [2 * p * r / (p + r) for p, r in [(1 / 3, 1 / 2), (1, 2 / 3), (2 / 3, 2 / 3)]]
    assert m["macro_f1"] == pytest.approx(sum(f1) / 3)
    assert m["per_class"]["b"]["recall"] == pytest.approx(2 / 3)


@pytest.mark.parametrize("preset", ["gpt2-tiny", "llama-tiny"])
def test_hf_sequence_classifier_gives_our_logits(preset: str) -> None:
    """Exported as GPT2ForSequenceClassification / LlamaForSequenceClassification, the same
    logits on a right-padded batch (HF finds the last non-padding token itself)."""
    torch.manual_seed(0)
    model = GPT(ModelConfig.from_preset(preset)).eval()
    head = new_head(model, 3)
    pad = 0
    examples = [Example(torch.randint(1, 512, (n,)).tolist(), 0) for n in (7, 20, 3)]
    batch = collate(examples, pad)
    ours = class_logits(model, head, batch, "last")
    hf = to_hf(model, classifier={"weight": head.weight, "labels": ["x", "y", "z"],
                                  "pad_id": pad, "pooling": "last"})
    theirs = hf(batch["idx"], attention_mask=(batch["idx"] != pad).long()).logits
    assert (ours - theirs).abs().max() <= 1e-4


def classify_cfg(base: Path, *overrides: str) -> ClassifyConfig:
    return load_config(ClassifyConfig, None, [
        f"--classify.model={base}", "--train.max_steps=60", "--train.epochs=0",
        "--train.micro_batch=8", "--train.lr=3e-3", "--train.eval_every=30",
        "--classify.trainable=all", "--classify.pooling=mean", "--classify.max_length=64",
        *overrides])


def test_sms_spam_learns_and_writes_its_outputs(tiny_run: Path, shared_data: Path,
                                                tmp_path: Path) -> None:
    cfg = classify_cfg(tiny_run, f"--classify.data={sms(shared_data)}",
                       "--classify.balance=undersample")
    summary = run_classify(cfg, tmp_path / "run", progress=False)
    # From a 60-step model, 60 steps of 8 messages: far above the 50% of a balanced guess.
    assert summary["metrics"]["test"]["accuracy"] > 0.8
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert set(metrics) == {"train", "val", "test"}
    assert set(metrics["test"]["per_class"]) == {"ham", "spam"}
    assert sum(map(sum, metrics["test"]["confusion"])) == 300
    for name in ("confusion.png", "curves.png", "loss.png"):
        assert (tmp_path / "run" / name).stat().st_size > 5000
    final = tmp_path / "run" / "final"
    meta = json.loads((final / "classifier.json").read_text())
    assert meta["labels"] == ["ham", "spam"] and meta["pooling"] == "mean"
    clf = Classifier(final)
    label, prob = clf.predict(["WINNER!! You have won a FREE prize, call now to claim"])[0]
    assert label == "spam" and 0.5 < prob <= 1.0


def test_the_auxiliary_lm_loss_joins_the_training_loss_only(tiny_run: Path, shared_data: Path,
                                                           tmp_path: Path) -> None:
    """With lm_weight the first step's training loss is the classification loss plus the
    weighted LM loss (both per example); the validation loss stays classification alone."""
    runs = {}
    for weight in (0.0, 0.5):
        cfg = classify_cfg(tiny_run, f"--classify.data={sms(shared_data)}", "--train.max_steps=1",
                           f"--classify.lm_weight={weight}", "--train.eval_every=1")
        runs[weight] = run_classify(cfg, tmp_path / str(weight), progress=False)
    first = {w: json.loads((tmp_path / str(w) / "metrics.jsonl").read_text().splitlines()[0])
             for w in runs}
    # Same first batch and head: the difference is 0.5 x the batch's mean LM loss, which for a
    # tiny Shakespeare model on SMS text lies between a good model's and a random one's.
    lm = (first[0.5]["loss"] - first[0.0]["loss"]) / 0.5
    assert 3 < lm < 10, lm
    val = [runs[w]["metrics"]["val"]["loss"] for w in (0.0, 0.5)]
    assert val[0] < 1 and abs(val[1] - val[0]) < 0.05, val  # classification alone, no LM term


def test_fine_tuning_dropout_applies_to_training_only(tiny_run: Path, shared_data: Path,
                                                     tmp_path: Path) -> None:
    """classify.dropout: the same first batch and head give another training loss with dropout
    on, while evaluation (dropout off) before any update is the same."""
    first = {}
    for rate in ("none", "0.5"):
        extra = [] if rate == "none" else [f"--classify.dropout={rate}"]
        cfg = classify_cfg(tiny_run, f"--classify.data={sms(shared_data)}", "--train.max_steps=1",
                           "--train.lr=1e-12", "--train.eval_every=1", *extra)
        run_classify(cfg, tmp_path / rate, progress=False)
        first[rate] = json.loads((tmp_path / rate / "metrics.jsonl").read_text().splitlines()[0])
    # A new head starts near ln 2 whatever the features, so dropout moves the loss little, but
    # without it the two runs are the same computation (equal to float noise, ~1e-7).
    assert abs(first["0.5"]["loss"] - first["none"]["loss"]) > 1e-4
    assert first["0.5"]["val_loss"] == pytest.approx(first["none"]["val_loss"], abs=1e-6)


def test_fine_tuning_a_probe_starts_from_its_head(tiny_run: Path, shared_data: Path,
                                                 tmp_path: Path, capsys) -> None:
    """LP-FT: a classifier given as --model with the same labels and pooling lends its head
    (its validation loss is where the probe ended); another pooling gets a new head."""
    data = f"--classify.data={sms(shared_data)}"
    probe = run_classify(classify_cfg(tiny_run, data, "--classify.trainable=head",
                                      "--train.max_steps=20", "--train.eval_every=0"),
                         tmp_path / "probe", progress=False)
    first = {}
    for pooling in ("mean", "last"):
        cfg = classify_cfg(tmp_path / "probe", data, "--train.max_steps=1", "--train.lr=1e-12",
                           "--train.eval_every=1", f"--classify.pooling={pooling}")
        run_classify(cfg, tmp_path / pooling, progress=False)
        first[pooling] = json.loads((tmp_path / pooling / "metrics.jsonl").read_text()
                                    .splitlines()[0])
    out = capsys.readouterr().out
    assert "starting from the head of" in out and "a new head" in out
    assert first["mean"]["val_loss"] == pytest.approx(probe["metrics"]["val"]["loss"], abs=1e-5)
    assert abs(first["last"]["val_loss"] - probe["metrics"]["val"]["loss"]) > 1e-3


def test_only_what_is_asked_trains(tiny_run: Path, shared_data: Path, tmp_path: Path) -> None:
    """trainable=last: the last block, the final norm and the head change; the rest does not."""
    from safetensors.torch import load_file

    cfg = classify_cfg(tiny_run, f"--classify.data={sms(shared_data)}", "--train.max_steps=3",
                       "--classify.trainable=last", "--train.eval_every=0")
    run_classify(cfg, tmp_path, progress=False)
    before = load_file(str(tiny_run / "final" / "model.safetensors"))
    after = load_file(str(tmp_path / "final" / "model.safetensors"))
    for name, tensor in before.items():
        changed = not torch.equal(tensor, after[name])
        assert changed == (name.startswith("blocks.1.") or name.startswith("norm_f")), name


def test_cli_finetune_classify_then_classify_and_export(tiny_run: Path, shared_data: Path,
                                                       tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    assert main(["finetune", "classify", "--model", str(tiny_run), "--data",
                 str(sms(shared_data)), "--out", str(out), "--quiet", "--train.max_steps=4",
                 "--train.eval_every=0", "--classify.max_length=32"]) == 0
    assert "test: accuracy" in capsys.readouterr().out
    assert main(["classify", "--model", str(out), "free entry to win cash", "see you at 5"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and all(line.split("\t")[0] in ("ham", "spam") for line in lines)
    assert main(["convert", "--to-hf", str(out), "--out", str(tmp_path / "hf")]) == 0
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "hf")
    assert hf.config.id2label == {0: "ham", 1: "spam"}
    clf = Classifier(out)
    text = "free entry to win cash"
    ids = torch.tensor([clf.tokenizer.encode(text, disallowed_special=())])
    probs = hf(ids).logits.softmax(-1)[0]
    assert torch.allclose(probs, clf.probabilities([text])[0], atol=1e-4)


BAD = [
    ("--classify.label_field=kind", "has no field 'kind'"),
    ("ONE", "label 'rare' has only one example"),
    ("EMPTY", "record 2 has an empty 'text'"),
    ("FILES", "the test file has label 'other', which the training file never has"),
    ("NOTMODEL", "not a model directory"),
    ("--classify.split=[0.5, 0.5]", "classify.split must be three fractions"),
]


@pytest.mark.parametrize("flag, message", BAD)
def test_bad_input_is_one_line_and_writes_nothing(flag: str, message: str, tiny_run: Path,
                                                  tmp_path: Path, capsys) -> None:
    data = tmp_path / "data.jsonl"
    rows = [{"text": f"message {i}", "label": "a" if i % 2 else "b"} for i in range(20)]
    if flag == "ONE":
        rows.append({"text": "odd one", "label": "rare"})
    if flag == "EMPTY":
        rows[1]["text"] = "  "
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = ["finetune", "classify", "--model", str(tiny_run), "--out", str(tmp_path / "out"),
            "--quiet", "--data", str(data)]
    if flag == "FILES":
        other = tmp_path / "other.jsonl"
        other.write_text(json.dumps({"text": "x", "label": "other"}) + "\n")
        args = args[:-2] + ["--train", str(data), "--val", str(data), "--test", str(other)]
    elif flag == "NOTMODEL":
        args[3] = str(tmp_path)
    elif flag.startswith("--"):
        args.append(flag)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "out").exists()


def test_a_model_dir_of_another_kind_is_refused(tiny_run: Path, tmp_path: Path) -> None:
    with pytest.raises(ScratchError, match="is not a classifier"):
        Classifier(tiny_run)
    with pytest.raises(ScratchError, match="not a model directory"):
        Classifier(tmp_path)


def parity_args(tiny_run: Path, shared_data: Path) -> list[str]:
    return ["finetune", "classify", "--model", str(tiny_run), "--data", str(sms(shared_data)),
            "--quiet", "--classify.balance=undersample", "--classify.max_length=48",
            "--classify.trainable=all", "--train.max_steps=8", "--train.epochs=0",
            "--train.micro_batch=4", "--train.global_batch=8", "--train.eval_every=4",
            "--train.checkpoint_every=4", "--train.lr=1e-3"]


@pytest.mark.distributed
@pytest.mark.parametrize("zero", [0, 2])
def test_ddp_and_zero2_equal_one_process(tiny_run: Path, shared_data: Path, tmp_path: Path,
                                         zero: int) -> None:
    """Two processes (DDP, or ZeRO-2 through FSDP2) on the same global batch of 8 examples:
    the loss of every step equals one process's, and so do the final head and model."""
    from safetensors.torch import load_file

    from helpers import SCRATCHLM, losses, torchrun

    args = parity_args(tiny_run, shared_data)
    import subprocess

    subprocess.run(SCRATCHLM + args + ["--out", str(tmp_path / "one")], check=True,
                   capture_output=True)
    torchrun(*args, "--out", str(tmp_path / "two"), "--parallel.dp=2",
             f"--parallel.zero={zero}")
    assert losses(tmp_path / "two") == pytest.approx(losses(tmp_path / "one"), abs=1e-5)
    for name in ("model.safetensors", "classifier.safetensors"):
        a = load_file(str(tmp_path / "one" / "final" / name))
        b = load_file(str(tmp_path / "two" / "final" / name))
        for key in a:
            torch.testing.assert_close(a[key], b[key], atol=5e-4, rtol=1e-3)


@pytest.mark.slow
def test_sigkill_then_resume_equals_uninterrupted_run(tiny_run: Path, shared_data: Path,
                                                      tmp_path: Path) -> None:
    from helpers import sigkill_then_resume

    sigkill_then_resume(parity_args(tiny_run, shared_data), tmp_path, 4,
                        ["model.safetensors", "classifier.safetensors"])
