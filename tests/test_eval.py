"""`scratchlm evaluate`: task files and their errors, the built-in tasks and the text they are
drawn from, scoring against a plain forward pass and lm-eval's own rules, and lm-evaluation-
harness itself as the referee: its `hf` model on our Hugging Face export, and our `scratchlm`
model class through its command line, give our numbers."""

from __future__ import annotations

import json
import math
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from scratchlm.cli import main
from scratchlm.errors import ScratchError
from scratchlm.eval.evaluate import evaluate_tasks, model_fingerprint, tokenizer_fingerprint
from scratchlm.eval.loglik import encode_pairs, rolling_loglikelihoods, rolling_windows, score_pairs
from scratchlm.eval.tasks import resolve_task
from scratchlm.model.load import load_pretrained


@pytest.fixture(scope="module")
def model_dir(prepared, tmp_path_factory) -> Path:
    """A model directory with the tiny-cpu recipe's shape and tokenizer and seeded random
    weights, not trained: these tests compare our numbers with lm-eval's and with plain
    forward passes, for which any weights do, and training one costs a minute of a shared
    CPU. The tied embedding is scaled by 10 so that logits spread about as a trained model's
    do (std ~1.6 rather than ~0.16): greedy answers then never hang on a near tie that float
    rounding could break one way in transformers and the other way here."""
    from scratchlm.config import Config, load_config
    from scratchlm.model.checkpoint import save_model
    from scratchlm.tokenizer import BPETokenizer
    from scratchlm.train.pretrain import build_model

    tok_dir, _ = prepared
    tok = BPETokenizer.load(tok_dir)
    cfg = load_config(Config, Path(__file__).resolve().parents[1] / "configs" / "tiny-cpu.yaml")
    model, _ = build_model(cfg, tok)
    with torch.no_grad():
        model.tok_emb.weight.mul_(10.0)
    return save_model(model, tmp_path_factory.mktemp("model") / "model", tok)


@pytest.fixture(scope="module")
def tiny(model_dir: Path):
    model, tok, _ = load_pretrained(model_dir)
    return model, tok


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


MC = [{"context": "ROMEO:\nBut soft, what light through yonder window",
       "choices": [" breaks", " sings", " falls asleep", " eats"], "gold": 0},
      {"context": "HAMLET:\nTo be, or not to", "choices": [" be", " go", " sleep"], "gold": 0},
      {"context": "KING RICHARD III:\nNow is the winter of our",
       "choices": [" discontent", " summer", " cat"], "gold": 0},
      {"context": "", "choices": ["JULIET:\nO Romeo", "JULIET:\nO cheese"], "gold": 0},
      {"context": "MACBETH:\nTomorrow, and tomorrow, and ",
       "choices": ["tomorrow", "yesterday", "today"], "gold": 0},
      {"context": "LEAR:\nBlow, winds, and crack your",
       "choices": [" cheeks", " knuckles", " eggs", " jokes"], "gold": 0}]
GEN = [{"context": "ROMEO:\nBut soft, what light", "answer": "breaks",
        "until": ["\n"], "max_new_tokens": 6},
       {"context": "HAMLET:\nTo be, or not to", "answer": "be", "until": ["\n"],
        "max_new_tokens": 6},
       {"context": "FIRST CITIZEN:\nWe are accounted poor", "answers": ["citizens", "men"],
        "until": ["\n"], "max_new_tokens": 6},
       {"context": "KING:\nMy lord", "answer": "sir", "until": ["\n"], "max_new_tokens": 6}]


# ------------------------------------------------------------------------------------------------
# task files


@pytest.mark.parametrize("rows, message", [
    ([{"context": "a", "choices": ["x", "y"], "gold": 2}],
     r"t\.jsonl:1: gold index 2 is out of range for 2 choices; it must be 0\.\.1"),
    ([{"context": "a", "choices": ["x", " "], "gold": 0}], r"t\.jsonl:1: choice 1 is empty"),
    ([{"context": "a", "choices": ["x", "y"], "gold": 0}, "{not json"],
     r"t\.jsonl:2: not valid JSON"),
    ([{"context": "a", "choices": ["x", "y"], "gold": "x"}], r"'gold' must be the index"),
    ([{"context": "a", "choices": ["x"], "gold": 0}], r"at least two strings"),
    ([{"context": "  ", "choices": ["x", "y"], "gold": 0}], r"only whitespace"),
    ([{"context": "a", "choices": ["x", "y"], "gold": 0}, {"context": "b", "answer": "c"}],
     r"t\.jsonl:2: a generation line in a multiple choice task"),
    ([{"context": "a", "answer": ""}], r"'answer' must be a non-empty string"),
    ([{"context": "a", "answer": "b", "max_new_tokens": 0}], r"'max_new_tokens'"),
    ([{"prompt": "a"}], r"neither 'choices'"),
    ([], r"has no examples"),
])
def test_bad_task_files_are_refused_with_the_line(rows, message, tmp_path: Path) -> None:
    with pytest.raises(ScratchError, match=message):
        resolve_task(str(write_jsonl(tmp_path / "t.jsonl", rows)))


def test_task_names_resolve(tmp_path: Path) -> None:
    with pytest.raises(ScratchError, match="no built-in task 'nope'"):
        resolve_task("builtin:nope")
    with pytest.raises(ScratchError, match="expected builtin:NAME"):
        resolve_task(str(tmp_path / "t.csv"))
    task = resolve_task(str(write_jsonl(tmp_path / "t.jsonl", MC)))
    assert (task.kind, len(task.examples), task.examples[1].choices) == \
        ("multiple_choice", 6, (" be", " go", " sleep"))
    gen = resolve_task(str(write_jsonl(tmp_path / "g.jsonl", GEN)))
    assert gen.kind == "generation" and gen.examples[2].answers == ("citizens", "men")
    assert task.fingerprint() != gen.fingerprint()
    assert task.fingerprint() == resolve_task(str(tmp_path / "t.jsonl")).fingerprint()


# ------------------------------------------------------------------------------------------------
# the built-in tasks


def test_builtin_tasks_hold_the_scenes_pretraining_held_out(prepared) -> None:
    """The scenes the tasks come from are the validation split the tiny-cpu recipe's data
    preparation made (val_fraction 0.05): their tokens add up to its validation tokens."""
    from scratchlm.data.clean import clean
    from scratchlm.data.config import DataConfig
    from scratchlm.data.loader import read_manifest
    from scratchlm.eval.builtin import held_out_scenes
    from scratchlm.tokenizer import BPETokenizer

    tok_dir, data_dir = prepared
    tok = BPETokenizer.load(tok_dir)
    scenes = held_out_scenes(0.05)
    texts = [clean(s.text, DataConfig().filters) for s in scenes]
    tokens = sum(len(ids) + 1 for ids in tok.encode_batch(texts, disallowed_special=()))
    assert 30 <= len(scenes) <= 45  # 5% of 783 scenes
    assert tokens == read_manifest(data_dir)["tokens_val"]


def test_builtin_examples_are_the_text_of_their_scenes() -> None:
    from scratchlm.eval.builtin import builtin_task, held_out_scenes

    scenes = [s.text for s in held_out_scenes()]
    speaker, next_line, cloze = (builtin_task(n) for n in ("speaker", "next_line", "cloze"))
    assert len(speaker.examples) == len(next_line.examples) == len(cloze.examples) == 400
    for e in speaker.examples[:60]:
        gold = e.choices[e.gold]
        assert any(e.context + gold in s for s in scenes)  # the true speaker and line
        assert len({c.split(":", 1)[1] for c in e.choices}) == 1  # only the name differs
        assert 2 <= len(e.choices) <= 8 and e.context.endswith("\n")
    for e in next_line.examples[:60]:
        assert any(e.context + e.choices[e.gold] + "\n" in s for s in scenes)
        assert len(e.choices) == 4 and len(set(e.choices)) == 4
        assert all(any(c in s for s in scenes) for c in e.choices)  # distractors: real lines
    for e in cloze.examples[:60]:
        assert any(e.context + " " + e.answers[0] in s for s in scenes)
        assert e.answers[0].isalpha() and len(e.answers[0]) >= 4
    assert builtin_task("speaker").fingerprint() == speaker.fingerprint()  # fixed seed


# ------------------------------------------------------------------------------------------------
# scoring


def test_requests_are_split_into_tokens_as_lm_eval_splits_them(tiny) -> None:
    """lm-eval's TemplateLM.loglikelihood (trailing spaces moved, the whole encoded, an empty
    context replaced by <|endoftext|>) with our tokenizer hands its model the pairs we make."""
    from lm_eval.api.model import TemplateLM

    _, tok = tiny

    class Capture(TemplateLM):
        eot_token_id = tok.eot_id

        def tok_encode(self, string, add_special_tokens=None, **kwargs):
            return tok.encode_batch([string], disallowed_special=())[0]

        def _loglikelihood_tokens(self, requests, **kwargs):
            return [(ctx, cont) for _, ctx, cont in requests]

        def loglikelihood_rolling(self, requests, disable_tqdm=False):
            raise NotImplementedError

        def generate_until(self, requests, disable_tqdm=False):
            raise NotImplementedError

    requests = [("Hello", " world"), ("Hello ", "world"), ("ROMEO:\n", "But soft"),
                ("", "To be"), ("a\n\n", "b c"), ("HAMLET:\nTo be, or not to", " be"),
                ("x  \n ", " y"), ("", " leading")]

    class Request:
        def __init__(self, args):
            self.args = args

    theirs = Capture().loglikelihood([Request(r) for r in requests], disable_tqdm=True)
    assert encode_pairs(tok, requests) == [(list(a), list(b)) for a, b in theirs]


def test_scores_equal_a_plain_forward_pass_of_each_pair(tiny) -> None:
    model, tok = tiny
    block = model.config.block_size
    g = torch.Generator().manual_seed(0)
    pairs = []
    for n_ctx, n_cont in [(1, 1), (5, 3), (60, 20), (block, 4), (block + 50, 9), (3, block)]:
        ids = torch.randint(0, tok.vocab_size, (n_ctx + n_cont,), generator=g).tolist()
        pairs.append((ids[:n_ctx], ids[n_ctx:]))
    greedy_ctx = pairs[1][0]  # a continuation that is the model's own greedy choice
    with torch.no_grad():
        nxt = model(torch.tensor([greedy_ctx]))[0][0, -1].argmax().item()
    pairs.append((greedy_ctx, [nxt]))
    expected = []
    with torch.no_grad():
        for ctx, cont in pairs:
            seq = (ctx + cont)[-(block + 1):]
            logp = torch.log_softmax(model(torch.tensor([seq[:-1]]))[0][0].double(), -1)
            rows = range(len(seq) - 1 - len(cont), len(seq) - 1)
            expected.append((sum(logp[r, seq[r + 1]].item() for r in rows),
                             all(logp[r].argmax().item() == seq[r + 1] for r in rows)))
    for batch_size in (1, 3, 16):
        got = score_pairs(model, pairs, batch_size)
        assert [g_ for _, g_ in got] == [e for _, e in expected]
        for (lp, _), (ref, _) in zip(got, expected):
            assert lp == pytest.approx(ref, rel=1e-5, abs=1e-4)
    assert got[-1][1] and not got[2][1]
    with pytest.raises(ScratchError, match="longer than the model's context"):
        score_pairs(model, [([1], [2] * (block + 1))])


def test_rolling_windows_are_lm_evals(tiny) -> None:
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    for n in (1, 5, 127, 128, 129, 300, 512):
        tokens = list(range(1000, 1000 + n))
        theirs = [make_disjoint_window(w) for w in get_rolling_token_windows(tokens, 7, 128, 1)]
        assert rolling_windows(tokens, 7, 128) == [(list(a), list(b)) for a, b in theirs]
    model, tok = tiny
    text = "ROMEO:\nBut soft, what light through yonder window breaks?\n"
    ids = [tok.eot_id] + tok.encode(text)
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids[:-1]]))[0][0].double(), -1)
    direct = sum(logp[i, ids[i + 1]].item() for i in range(len(ids) - 1))
    assert rolling_loglikelihoods(model, tok, [text])[0] == pytest.approx(direct, rel=1e-5)


def test_evaluate_tasks_for_a_training_loop(tiny, tmp_path: Path) -> None:
    """In memory, any batch size, the model left in training mode; acc and acc_norm from the
    log-likelihoods by lm-eval's definitions, standard errors as its mean_stderr."""
    model, tok = tiny
    mc = str(write_jsonl(tmp_path / "mc.jsonl", MC))
    model.train()
    a = evaluate_tasks(model, tok, f"{mc},builtin:speaker", limit=6, batch_size=16,
                       log_samples=True)
    assert model.training
    b = evaluate_tasks(model, tok, [mc, "builtin:speaker"], limit=6, batch_size=5,
                       log_samples=True)
    model.eval()
    for name, entry in a["tasks"].items():
        for x, y in zip(entry["samples"], b["tasks"][name]["samples"]):
            assert x["loglikelihoods"] == pytest.approx(y["loglikelihoods"], abs=1e-4)
        assert entry["metrics"] == b["tasks"][name]["metrics"]
    task = resolve_task(mc)
    samples = a["tasks"]["mc"]["samples"]
    acc = [float(max(range(len(s["loglikelihoods"])), key=lambda i: s["loglikelihoods"][i])
                 == s["gold"]) for s in samples]
    norm = [float(max(range(len(e.choices)), key=lambda i: s["loglikelihoods"][i]
                      / len(e.choices[i])) == e.gold) for s, e in zip(samples, task.examples)]
    m = a["tasks"]["mc"]["metrics"]
    assert m["acc"] == pytest.approx(sum(acc) / 6) and m["acc_norm"] == pytest.approx(
        sum(norm) / 6)
    assert m["acc_stderr"] == pytest.approx(statistics.stdev(acc) / math.sqrt(6))
    assert a["tasks"]["mc"]["chance"] == pytest.approx((1 / 4 + 3 / 3 + 1 / 2 + 1 / 4) / 6)
    assert a["tasks"]["builtin:speaker"]["examples"] == 6
    assert a["model"]["fingerprint"] == model_fingerprint(model)
    assert a["tokenizer"]["fingerprint"] == tokenizer_fingerprint(tok)


# ------------------------------------------------------------------------------------------------
# the command line


def test_evaluate_command(model_dir: Path, tiny, tmp_path: Path, monkeypatch, capsys) -> None:
    from scratchlm.eval.perplexity import evaluate_text

    model, tok = tiny
    text = tmp_path / "held.txt"
    text.write_text("KING:\nWhat say you?\n\nQUEEN:\nNothing, my lord.\n" * 40)
    gen = write_jsonl(tmp_path / "gen.jsonl", GEN)
    out = tmp_path / "results.json"
    argv = ["evaluate", "--model", str(model_dir), "--tasks",
            f"builtin:speaker,builtin:cloze,{gen},{text}", "--limit", "3", "--shots", "1",
            "--out", str(out), "--quiet"]
    assert main(argv) == 0
    results = json.loads(out.read_text())
    table = out.with_suffix(".md").read_text()
    assert "| builtin:speaker | multiple_choice | 3 | acc |" in table
    assert "| gen | generation | 3 | exact_match |" in capsys.readouterr().out
    assert results["model"]["fingerprint"] == model_fingerprint(model)
    assert results["tokenizer"]["fingerprint"] == tokenizer_fingerprint(tok)
    assert results["tasks"]["gen"]["fingerprint"] == resolve_task(str(gen)).fingerprint()
    assert results["settings"] == {"shots": 1, "limit": 3, "fewshot_seed": 1234,
                                   "batch_size": 16}
    ppl = results["tasks"]["held"]["metrics"]
    assert ppl["bpb"] == pytest.approx(evaluate_text(model, tok, text.read_text())["bpb"])
    # refuse before writing: the results are there
    assert main(argv) == 2
    assert "already exists; choose another --out or pass --overwrite" in capsys.readouterr().err
    assert main(argv + ["--overwrite"]) == 0


def test_evaluate_bad_input(model_dir: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"context": "a", "choices": ["x", "y", "z"],
                                                "gold": 3}])
    assert main(["evaluate", "--model", str(model_dir), "--tasks", str(bad), "--out",
                 str(tmp_path / "r.json")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "bad.jsonl:1: gold index 3 is out of range" in err
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(model_dir / name, bare / name)
    assert main(["evaluate", "--model", str(bare), "--tasks", "builtin:speaker", "--out",
                 str(tmp_path / "r.json")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no tokenizer" in err and "--tokenizer DIR" in err
    assert not (tmp_path / "r.json").exists()


# ------------------------------------------------------------------------------------------------
# lm-evaluation-harness as the referee


def test_scratchlm_model_class_is_registered_with_lm_eval() -> None:
    """Both ways lm-eval finds an outside model: the `lm_eval.models` entry point in our
    package metadata (its plugin discovery) and its registry once our module is imported."""
    from importlib.metadata import entry_points

    from lm_eval.api.registry import get_model, model_registry

    from scratchlm.eval.harness import ScratchLM

    (point,) = [e for e in entry_points(group="lm_eval.models") if e.name == "scratchlm"]
    assert point.load() is ScratchLM
    assert get_model("scratchlm") is ScratchLM
    assert "hf" in model_registry  # lm-eval's own models are still there


def test_scratchlm_model_class_imports_without_lm_eval(model_dir: Path) -> None:
    code = (
        "import sys; sys.modules['lm_eval'] = None\n"
        "from scratchlm.eval.harness import ScratchLM, register\n"
        "assert ScratchLM.__mro__[1] is object and not register()\n"
        f"lm = ScratchLM(path={str(model_dir)!r}, device='cpu')\n"
        "(ll, greedy), = lm.loglikelihood([('ROMEO:\\n', 'But soft')])\n"
        "assert ll < 0 and greedy in (True, False)\n"
        "print(lm.generate_until([('HAMLET:\\n', {'until': ['\\n'], 'max_gen_toks': 5})]))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]


ROLLING = """task: scratchlm_rolling
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: text
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
"""


@pytest.mark.slow
def test_lm_eval_hf_and_scratchlm_agree_with_scratchlm_evaluate(
        model_dir: Path, tiny, tmp_path: Path, monkeypatch) -> None:
    """One local task set (no hub): the built-in next-line task, a multiple-choice and a
    generation file of our format exported as lm-eval tasks, and a rolling-log-likelihood
    task; two shots. (a) `lm_eval --model hf` on our Hugging Face export (Python API),
    (b) `python -m scratchlm.eval run --model scratchlm` (the command line), and ours give the
    same acc and acc_norm, the same log-likelihoods and few-shot prompts, the same greedy
    answers and the same bits per byte."""
    from functools import partialmethod

    import lm_eval
    from lm_eval.tasks import TaskManager

    from scratchlm.eval.harness import export_lm_eval_tasks
    from scratchlm.model.hf import save_hf

    model, tok = tiny
    hf_dir = tmp_path / "hf"
    save_hf(model, hf_dir, tok)
    tasks_dir = tmp_path / "tasks"
    mc, gen = write_jsonl(tmp_path / "mc.jsonl", MC), write_jsonl(tmp_path / "gen.jsonl", GEN)
    tasks = [resolve_task("builtin:next_line"), resolve_task(str(mc)), resolve_task(str(gen))]
    names = [p.stem for p in export_lm_eval_tasks(tasks, tasks_dir)]
    texts = ["ROMEO:\nBut soft, what light through yonder window breaks? " * 12,
             "HAMLET:\nTo be, or not to be, that is the question.\n",
             "KING:\n" + "Now is the winter of our discontent. " * 30]
    write_jsonl(tmp_path / "roll.jsonl", [{"text": t} for t in texts])
    (tasks_dir / "scratchlm_rolling.yaml").write_text(ROLLING.format(data=tmp_path / "roll.jsonl"))
    names.append("scratchlm_rolling")
    limit, shots = 6, 2
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    # lm-eval indexes its own ~27,000 task files before it looks at ours, most of this test's
    # time on a shared CPU; these tasks need none of them.
    monkeypatch.setattr(TaskManager, "__init__",
                        partialmethod(TaskManager.__init__, include_defaults=False))
    a = lm_eval.simple_evaluate(
        model="hf", model_args=f"pretrained={hf_dir},dtype=float32", tasks=names,
        num_fewshot=shots, limit=limit, device="cpu", batch_size=4, log_samples=True,
        task_manager=TaskManager(include_path=str(tasks_dir)))
    # (b) through lm-eval's own command line, in this process: `python -m scratchlm.eval` is
    # that command line with our model registered, and a second interpreter would spend half
    # of this test importing torch and lm-eval again.
    from scratchlm.eval.__main__ import main as lm_eval_main

    out = tmp_path / "lm-eval-out"
    monkeypatch.setattr(sys, "argv", [
        "python -m scratchlm.eval", "run", "--model", "scratchlm", "--model_args",
        f"path={model_dir}", "--tasks", *names, "--include_path", str(tasks_dir),
        "--num_fewshot", str(shots), "--limit", str(limit), "--device", "cpu",
        "--batch_size", "4", "--log_samples", "--output_path", str(out)])
    lm_eval_main()
    (results_file,) = out.rglob("results_*.json")
    b_results = json.loads(results_file.read_text())["results"]
    b_samples = {n: [json.loads(line) for line in next(out.rglob(f"samples_{n}_*.jsonl"))
                     .read_text().splitlines()] for n in names}
    ours = evaluate_tasks(model, tok, tasks, shots=shots, limit=limit, log_samples=True)

    from scratchlm.eval.evaluate import fewshot_contexts

    for name, task in zip(names, tasks):
        mine = ours["tasks"][task.name]
        a_samples = sorted(a["samples"][name], key=lambda s: s["doc_id"])
        b_sorted = sorted(b_samples[name], key=lambda s: s["doc_id"])
        prompts = fewshot_contexts(task.examples, shots, limit)
        assert [s["arguments"][0][0] for s in a_samples] == prompts
        if task.kind == "multiple_choice":
            for metric in ("acc", "acc_norm"):
                assert a["results"][name][f"{metric},none"] == mine["metrics"][metric]
                assert b_results[name][f"{metric},none"] == mine["metrics"][metric]
                assert a["results"][name][f"{metric}_stderr,none"] == pytest.approx(
                    mine["metrics"][f"{metric}_stderr"])
            for sa, sb, so in zip(a_samples, b_sorted, mine["samples"]):
                lls_a = [float(r[0][0]) for r in sa["resps"]]
                lls_b = [float(r[0][0]) for r in sb["resps"]]
                assert lls_b == pytest.approx(so["loglikelihoods"], abs=1e-6)
                assert lls_a == pytest.approx(so["loglikelihoods"], abs=1e-3)
        else:
            outputs = [s["output"] for s in mine["samples"]]
            assert [s["resps"][0][0] for s in a_samples] == outputs
            assert [s["resps"][0][0] for s in b_sorted] == outputs
    roll = rolling_loglikelihoods(model, tok, texts)
    bpb = -sum(roll) / math.log(2) / sum(len(t.encode()) for t in texts)
    assert a["results"]["scratchlm_rolling"]["bits_per_byte,none"] == pytest.approx(bpb,
                                                                                    rel=1e-5)
    assert b_results["scratchlm_rolling"]["bits_per_byte,none"] == pytest.approx(bpb, rel=1e-6)


@pytest.mark.parametrize("data, warned", [
    ({"inputs": ["builtin"], "val_fraction": 0.05}, None),
    ({"inputs": ["builtin"], "val_fraction": 0.01}, "held out data.val_fraction 0.01"),
    ({"inputs": ["builtin"], "val_inputs": ["x.txt"]}, "trained on every built-in scene"),
    ({"inputs": ["my.txt"], "val_fraction": 0.0}, None),
])
def test_builtin_tasks_warn_when_the_model_trained_on_them(data, warned, tmp_path) -> None:
    import yaml

    from scratchlm.eval.builtin import held_out_warning

    (tmp_path / "run.yaml").write_text(yaml.safe_dump({"data": data}))
    got = held_out_warning(tmp_path)
    assert got is None if warned is None else warned in got


def test_evaluate_demo_model(model_dir: Path, tmp_path: Path, monkeypatch) -> None:
    from scratchlm.eval.builtin import BUILTIN_TASKS
    from scratchlm.eval.evaluate import evaluate_demo_model

    # Not the held-out perplexity (every held-out token: most of a minute on a shared CPU;
    # test_evaluate_command checks a perplexity task).
    monkeypatch.delitem(BUILTIN_TASKS, "heldout")
    table = evaluate_demo_model(model_dir, tmp_path / "eval.json", limit=2, progress=False)
    results = json.loads((tmp_path / "eval.json").read_text())
    assert table == tmp_path / "eval.md"
    assert set(results["tasks"]) == {f"builtin:{n}" for n in ("speaker", "next_line", "cloze")}
    assert "| builtin:next_line | multiple_choice | 2 | acc |" in table.read_text()
