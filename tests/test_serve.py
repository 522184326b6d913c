"""`scratchlm serve`: a real uvicorn server on a free loopback port, spoken to with OpenAI's own
client (and raw HTTP where the client would refuse to send the request): completions, chat,
streaming, concurrent clients against the same request alone, every bad request, a client that
goes away, the lm-evaluation-harness request forms, and `lm_eval` itself against the server."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
import torch
import uvicorn

from scratchlm.generate import generate_text, stream_text
from scratchlm.model.load import load_pretrained
from scratchlm.model.logprobs import token_logprobs
from scratchlm.serve import build_app
from scratchlm.templates import load_template


class LiveServer:
    """An app served by uvicorn on a thread of this process, on a port the OS picked."""

    def __init__(self, app) -> None:
        self.app = app
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]},
                                       daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)

    @property
    def engine(self):
        return self.app.state.served.engine

    def client(self, api_key: str = "none", **kwargs) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=api_key, max_retries=0,
                             timeout=120, **kwargs)

    def wait_idle(self, timeout: float = 60) -> None:
        """Until no generation is in flight (bounded: a test fails rather than hangs)."""
        deadline = time.monotonic() + timeout
        while self.engine.pending and time.monotonic() < deadline:
            time.sleep(0.02)
        assert self.engine.pending == 0

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


@pytest.fixture(scope="module")
def base(tiny_run: Path):
    server = LiveServer(build_app(tiny_run, max_batch=8, max_pending=32, model_name="tiny"))
    yield server
    server.close()


@pytest.fixture(scope="module")
def chat(chat_model: Path):
    server = LiveServer(build_app(chat_model, api_key="sekret", model_name="tiny-chat"))
    yield server
    server.close()


@pytest.fixture(scope="module")
def local(tiny_run: Path):
    """The model and tokenizer the base server serves, loaded here to compare against."""
    model, tok, _ = load_pretrained(tiny_run)
    return model, tok


# ------------------------------------------------------------------------------------------------
# what a client sees


def test_models_and_completion_equal_direct_generation(base: LiveServer, local) -> None:
    model, tok = local
    client = base.client()
    assert [m.id for m in client.models.list()] == ["tiny"]
    assert client.models.retrieve("tiny").id == "tiny"
    prompt = "First Citizen:\nBefore we proceed"
    r = client.completions.create(model="tiny", prompt=prompt, max_tokens=24, temperature=0)
    expected = generate_text(model, tok, prompt, 24, temperature=0.0)
    assert r.object == "text_completion" and r.model == "tiny"
    assert r.choices[0].text == expected
    assert r.choices[0].finish_reason == "length"
    n_prompt = len(tok.encode(prompt))
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (
        n_prompt, 24, n_prompt + 24)
    # a stop string ends the text before it, with finish_reason "stop"
    stop = expected[6:9]
    r = client.completions.create(model="tiny", prompt=prompt, max_tokens=24, temperature=0,
                                  stop=[stop])
    assert r.choices[0].text == expected[:expected.index(stop)]
    assert r.choices[0].finish_reason == "stop"
    # sampled with a seed: the same text as the library's, and again the same
    r1 = client.completions.create(model="tiny", prompt=prompt, max_tokens=16, temperature=0.9,
                                   top_p=0.9, seed=5)
    assert r1.choices[0].text == "".join(stream_text(model, tok, prompt, 16, temperature=0.9,
                                                     top_p=0.9, seed=5))
    r2 = client.completions.create(model="tiny", prompt=prompt, max_tokens=16, temperature=0.9,
                                   top_p=0.9, seed=5)
    assert r2.choices[0].text == r1.choices[0].text


def test_streamed_completion_equals_whole(base: LiveServer) -> None:
    client = base.client()
    kw = dict(model="tiny", prompt=["KING:", "Speak, speak."], max_tokens=20,
              temperature=0.8, seed=11, n=2)
    whole = client.completions.create(**kw)
    assert [c.index for c in whole.choices] == [0, 1, 2, 3]
    assert whole.choices[0].text != whole.choices[1].text  # choice j samples with seed + j
    texts, finish, chunks, usage = [""] * 4, [None] * 4, 0, None
    for chunk in client.completions.create(stream=True, stream_options={"include_usage": True},
                                           **kw):
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            texts[c.index] += c.text
            finish[c.index] = c.finish_reason or finish[c.index]
            chunks += 1
    assert texts == [c.text for c in whole.choices]
    assert finish == [c.finish_reason for c in whole.choices]
    assert chunks > 8  # token by token, not one piece
    assert usage is not None and usage.completion_tokens == whole.usage.completion_tokens


def test_chat_uses_the_models_template(chat: LiveServer, chat_model: Path) -> None:
    model, tok, _ = load_pretrained(chat_model)
    template = load_template(chat_model)
    client = chat.client(api_key="sekret")
    messages = [{"role": "system", "content": "Answer in verse."},
                {"role": "user", "content": "Who comes there?"}]
    r = client.chat.completions.create(model="tiny-chat", messages=messages, max_tokens=20,
                                       temperature=0)
    ids = template.encode(tok, messages, add_generation_prompt=True)[0]
    expected = "".join(stream_text(model, tok, ids, 20, temperature=0.0,
                                   stop_tokens=template.stop_ids(tok)))
    assert r.object == "chat.completion"
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == expected
    assert r.usage.prompt_tokens == len(ids)
    streamed, roles, reasons = "", [], []
    for chunk in client.chat.completions.create(model="tiny-chat", messages=messages,
                                                max_tokens=20, temperature=0, stream=True):
        assert chunk.object == "chat.completion.chunk"
        delta = chunk.choices[0].delta
        roles += [delta.role] if delta.role else []
        streamed += delta.content or ""
        reasons += [chunk.choices[0].finish_reason] if chunk.choices[0].finish_reason else []
    assert roles == ["assistant"] and streamed == expected
    assert reasons == [r.choices[0].finish_reason]
    # logprobs of the reply: one entry per token, the chosen one's at least its alternatives'
    r = client.chat.completions.create(model="tiny-chat", messages=messages, max_tokens=5,
                                       temperature=0, logprobs=True, top_logprobs=2)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    assert all(e.logprob == pytest.approx(e.top_logprobs[0].logprob) for e in content)


def test_chat_without_a_template_and_the_api_key(base: LiveServer, chat: LiveServer) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        base.client().chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "hi"}])
    assert e.value.code == "no_chat_template" and "base model" in e.value.message
    for key in ("none", "wrong"):
        with pytest.raises(openai.AuthenticationError):
            chat.client(api_key=key).models.list()
    assert httpx.get(f"{chat.url}/v1/models").status_code == 401
    assert [m.id for m in chat.client(api_key="sekret").models.list()] == ["tiny-chat"]


def test_sixteen_concurrent_clients_equal_each_alone(base: LiveServer) -> None:
    client = base.client()
    prompts = ["ROMEO:", "To be, or not", "What light", "JULIET:\nO", "Now is the winter",
               "Friends, Romans", "A horse!", "The quality of mercy"]
    requests = [dict(model="tiny", prompt=prompts[i % 8] * (1 + i % 3), max_tokens=8 + 3 * i,
                     temperature=0.0 if i % 4 == 0 else 0.7 + 0.05 * (i % 5), seed=100 + i)
                for i in range(16)]
    before = base.engine.stats["peak_running"]
    with ThreadPoolExecutor(16) as pool:
        together = list(pool.map(lambda kw: client.completions.create(**kw), requests))
    alone = [client.completions.create(**kw) for kw in requests]
    assert [r.choices[0].text for r in together] == [r.choices[0].text for r in alone]
    assert [r.usage.completion_tokens for r in together] == [
        r.usage.completion_tokens for r in alone]
    assert base.engine.stats["peak_running"] > max(before, 1)  # they shared forward passes


def raw_post(server: LiveServer, path: str, body, headers: dict | None = None,
             **kw) -> httpx.Response:
    content = body if isinstance(body, str) else json.dumps(body)
    return httpx.post(f"{server.url}{path}", content=content,
                      headers={"Content-Type": "application/json", **(headers or {})},
                      timeout=60, **kw)


@pytest.mark.parametrize("body, status, param", [
    ({"model": "gpt-5", "prompt": "x"}, 404, "model"),
    ({"prompt": "x " * 200}, 400, "prompt"),  # longer than the 128-token context
    ({"prompt": "x", "max_tokens": 500}, 400, "max_tokens"),
    ({"prompt": "x", "temperature": -1}, 400, "temperature"),
    ({"prompt": "x", "temperature": "hot"}, 400, "temperature"),
    ({"prompt": "x", "top_p": 0}, 400, "top_p"),
    ({"prompt": "x", "n": 0}, 400, "n"),
    ({"prompt": "x", "max_tokens": -1}, 400, "max_tokens"),
    ({"prompt": "x", "logprobs": 50}, 400, "logprobs"),
    ({"prompt": [5, 99999]}, 400, "prompt"),
    ({"prompt": []}, 400, "prompt"),
    ({"prompt": "x", "stop": ["a"] * 20}, 400, "stop"),
    ({"prompt": "x", "frequency_penalty": 1.0}, 400, "presence_penalty"),
    ({"max_tokens": 3}, 400, "prompt"),
    ({"prompt": "x", "seed": 99999999999999999999999}, 400, "seed"),  # past torch's 64 bits
    ({"prompt": "x", "seed": 2**64 - 1, "n": 2}, 400, "seed"),  # choice 1 would take 2**64
    ({"prompt": "x", "stop": [""]}, 400, "stop"),
    ({"prompt": "x", "stop": ["\n", ""]}, 400, "stop"),
])
def test_bad_completion_requests(base: LiveServer, body: dict, status: int, param: str) -> None:
    r = raw_post(base, "/v1/completions", {"model": "tiny", **body})
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["param"] == param and error["message"] and error["type"]
    assert "Traceback" not in error["message"]
    assert base.client().completions.create(model="tiny", prompt="x", max_tokens=2).choices


def test_malformed_json_and_unknown_routes(base: LiveServer) -> None:
    r = raw_post(base, "/v1/completions", '{"prompt": "x", ')
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    r = raw_post(base, "/v1/chat/completions", {"model": "tiny", "messages": []})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    r = httpx.get(f"{base.url}/v2/nothing")
    assert r.status_code == 404 and "error" in r.json()
    assert httpx.delete(f"{base.url}/v1/models").status_code == 405
    with pytest.raises(openai.NotFoundError):
        base.client().models.retrieve("gpt-5")
    assert base.client().completions.create(model="tiny", prompt="x", max_tokens=2).choices


def test_too_many_in_flight_is_429_and_a_disconnect_frees_the_slot(tiny_run: Path) -> None:
    server = LiveServer(build_app(tiny_run, max_batch=1, max_pending=1))
    try:
        client = server.client()
        name = server.app.state.served.model_name
        # more choices than --max-pending could ever hold: a 400 naming n, not a 429 to retry
        r = raw_post(server, "/v1/completions", {"prompt": "x", "max_tokens": 2, "n": 2})
        assert r.status_code == 400 and r.json()["error"]["param"] == "n", r.text
        assert "--max-pending" in r.json()["error"]["message"]
        r = raw_post(server, "/v1/completions", {"prompt": ["x", "y"], "max_tokens": 2})
        assert r.status_code == 400 and r.json()["error"]["param"] == "prompt", r.text
        long = dict(model=name, prompt="ROMEO:", max_tokens=120, temperature=0.8, seed=0)
        stream = client.completions.create(stream=True, **long)
        first = next(iter(stream))  # the request holds the only slot
        assert first.choices[0].text is not None
        with pytest.raises(openai.RateLimitError) as e:
            client.completions.create(model=name, prompt="x", max_tokens=2)
        assert e.value.status_code == 429
        stream.close()  # the client goes away mid-stream
        server.wait_idle()
        assert server.engine.stats["cancelled"] == 1
        assert server.engine.stats["tokens"] < 120  # it did not run to its end
        r = client.completions.create(model=name, prompt="x", max_tokens=2)
        assert r.choices[0].finish_reason == "length"
    finally:
        server.close()


def sse_events(r: httpx.Response) -> list:
    return [line[len("data: "):] for line in r.text.splitlines() if line.startswith("data: ")]


def test_a_huge_seed_is_400_and_the_server_keeps_serving(chat: LiveServer) -> None:
    """The user trial's crash: a seed torch cannot take killed the engine thread, and every
    request after it hung. Refused up front now, for chat and streams too."""
    auth = {"Authorization": "Bearer sekret"}
    body = {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4,
            "seed": 99999999999999999999999}
    for stream in (False, True):
        r = raw_post(chat, "/v1/chat/completions", {**body, "stream": stream}, headers=auth)
        assert r.status_code == 400, r.text
        assert r.json()["error"]["param"] == "seed" and "2**64" in r.json()["error"]["message"]
    r = raw_post(chat, "/v1/chat/completions", {**body, "seed": 2**64 - 1, "stream": True},
                 headers=auth)  # the largest seed torch takes
    assert r.status_code == 200 and sse_events(r)[-1] == "[DONE]"
    assert chat.client("sekret").chat.completions.create(
        model="tiny-chat", messages=body["messages"], max_tokens=4, seed=3).choices
    assert httpx.get(f"{chat.url}/health").json()["status"] == "ok"
    chat.wait_idle()


def test_a_failure_in_the_engine_fails_that_request_and_the_server_keeps_serving(
        base: LiveServer, monkeypatch) -> None:
    """An exception on the engine thread (a bug, not the request: here the model's forward
    raising once, then admission raising once) is a 500 with one line, or a stream's error
    event; the engine thread lives on and serves the next request as if nothing happened."""
    engine = base.engine
    body = {"model": "tiny", "prompt": "ROMEO:", "max_tokens": 6, "temperature": 0}
    expected = base.client().completions.create(**body).choices[0].text

    def fail_once(target, name: str) -> None:
        real = getattr(target, name)
        calls = []

        def failing(*args, **kwargs):
            calls.append(1)
            if len(calls) == 1:
                raise RuntimeError("injected failure\nsecond line")
            return real(*args, **kwargs)
        monkeypatch.setattr(target, name, failing)

    fail_once(engine.model, "forward")
    r = raw_post(base, "/v1/completions", {**body, "n": 2})
    assert r.status_code == 500, r.text
    error = r.json()["error"]
    assert error["type"] == "server_error" and "injected failure" in error["message"]
    assert "\n" not in error["message"] and "Traceback" not in error["message"]
    assert base.client().completions.create(**body).choices[0].text == expected

    fail_once(engine.model, "forward")
    r = raw_post(base, "/v1/completions", {**body, "stream": True})
    events = sse_events(r)
    assert r.status_code == 200 and "[DONE]" not in events  # streaming had begun: an event
    assert "injected failure" in json.loads(events[-1])["error"]["message"]

    fail_once(engine.batcher, "submit")  # the path a too-large seed used to crash
    r = raw_post(base, "/v1/completions", body)
    assert r.status_code == 500 and "injected failure" in r.json()["error"]["message"]

    assert base.client().completions.create(**body).choices[0].text == expected
    base.wait_idle()
    assert engine.alive and engine.running == 0
    assert httpx.get(f"{base.url}/health").json()["status"] == "ok"


# ------------------------------------------------------------------------------------------------
# what lm-evaluation-harness sends


def test_echo_logprobs_of_token_prompts_equal_direct(base: LiveServer, local) -> None:
    model, _ = local
    prompts = [[5, 300, 17, 900, 42, 7], [1000, 3, 3, 64]]
    for max_tokens in (0, 1):
        r = raw_post(base, "/v1/completions", {"model": "tiny", "prompt": prompts,
                                               "echo": True, "logprobs": 1,
                                               "max_tokens": max_tokens, "temperature": 0})
        assert r.status_code == 200, r.text
        for p, choice in zip(prompts, r.json()["choices"]):
            lp = choice["logprobs"]
            assert len(lp["token_logprobs"]) == len(p) + max_tokens
            assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
            ids = torch.tensor([p])
            with torch.no_grad():
                direct = token_logprobs(model(ids)[0][:, :-1], ids[:, 1:])[0].tolist()
            assert lp["token_logprobs"][1:len(p)] == pytest.approx(direct, abs=1e-6)
            for chosen, top in zip(lp["token_logprobs"][1:], lp["top_logprobs"][1:]):
                assert max(top.values()) >= chosen
            if max_tokens:  # the greedy token: its own log-prob is the best one
                assert lp["token_logprobs"][-1] == max(lp["top_logprobs"][-1].values())


def test_tokenizer_endpoints_with_lm_evals_remote_tokenizer(base: LiveServer, local) -> None:
    from lm_eval.utils import RemoteTokenizer, check_remote_tokenizer_support

    _, tok = local
    url = f"{base.url}/v1/completions"
    assert check_remote_tokenizer_support(url)
    remote = RemoteTokenizer(url)
    text = "Good morrow, cousin.<|endoftext|>\nWhat news?"
    assert remote.encode(text) == tok.encode(text, allowed_special="all")
    assert remote.decode(tok.encode(text, allowed_special="all")) == text
    assert remote.eos_token_id == tok.eot_id
    r = raw_post(base, "/detokenize", {"tokens": [10, 10 ** 6]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "tokens"


def lm_eval_task(directory: Path, tokenizer, shakespeare: str) -> list[dict]:
    """A small local multiple-choice task: which of four lines of Tiny Shakespeare follows a
    line. Written as lm-eval task YAML + JSONL (no download)."""
    lines = [ln for ln in shakespeare.splitlines()[2000:2400] if len(ln.split()) >= 4]
    docs = []
    for i in range(0, 40, 5):
        gold = i % 4
        choices = [lines[i + 1 + k] for k in range(4)]
        choices[0], choices[gold] = choices[gold], choices[0]
        docs.append({"context": lines[i], "choices": choices, "label": gold})
    (directory / "docs.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (directory / "next_line.yaml").write_text(
        "task: scratchlm_next_line\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {directory / 'docs.jsonl'}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        "doc_to_text: '{{context}}'\n"
        "doc_to_choice: '{{choices}}'\n"
        "doc_to_target: label\n"
        "metric_list:\n  - metric: acc\n  - metric: acc_norm\n")
    return docs


def direct_scores(model, tok, docs: list[dict]) -> tuple[float, float, list[list[float]]]:
    """acc and acc_norm computed here: each choice's log-likelihood after the context with
    scratchlm.model.logprobs, the pair split into tokens as lm-eval splits it (the whole
    string encoded, the context's tokens first, the continuation " " + choice the rest)."""
    acc = acc_norm = 0.0
    all_lls = []
    for d in docs:
        lls = []
        for choice in d["choices"]:
            ctx = tok.encode(d["context"], allowed_special="all")
            whole = tok.encode(d["context"] + " " + choice, allowed_special="all")
            ids = torch.tensor([whole])
            targets = ids[:, 1:].clone()
            targets[:, :len(ctx) - 1] = -100  # only the continuation's tokens count
            with torch.no_grad():  # summed in Python's doubles, as lm-eval sums them
                lls.append(sum(token_logprobs(model(ids)[0][:, :-1], targets)[0].tolist()))
        all_lls.append(lls)
        acc += max(range(4), key=lambda k: lls[k]) == d["label"]
        acc_norm += max(range(4), key=lambda k: lls[k] / len(d["choices"][k])) == d["label"]
    return acc / len(docs), acc_norm / len(docs), all_lls


@pytest.mark.slow
def test_lm_eval_local_completions_scores_equal_direct(base: LiveServer, local, tmp_path: Path,
                                                       shakespeare: str, monkeypatch) -> None:
    """lm-eval's own `local-completions` model (what `lm_eval --model local-completions` runs)
    against the live server, through lm-eval's Python entry point: the command line would first
    index every one of lm-eval's built-in tasks, tens of seconds on this machine, for a task
    that is not among them."""
    pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install "
                        "'lm-eval[api]')")
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    model, tok = local
    docs = lm_eval_task(tmp_path, tok, shakespeare)
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.setenv(var, "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    out = simple_evaluate(
        model="local-completions",
        model_args=f"model=tiny,base_url={base.url}/v1/completions,tokenizer_backend=remote,"
                   "max_length=128,num_concurrent=4,max_retries=1",
        tasks=["scratchlm_next_line"], log_samples=True,
        task_manager=TaskManager(include_path=str(tmp_path), include_defaults=False))
    scores = out["results"]["scratchlm_next_line"]
    acc, acc_norm, lls = direct_scores(model, tok, docs)
    assert scores["acc,none"] == pytest.approx(acc, abs=1e-9)
    assert scores["acc_norm,none"] == pytest.approx(acc_norm, abs=1e-9)
    samples = out["samples"]["scratchlm_next_line"]
    assert len(samples) == len(docs)
    for s in samples:  # every choice's log-likelihood, as lm-eval received it
        got = [float(resp[0][0]) for resp in s["resps"]]
        assert got == pytest.approx(lls[s["doc_id"]], abs=1e-9)


# ------------------------------------------------------------------------------------------------
# the command


@pytest.mark.slow
def test_serve_command_int8(tiny_run: Path) -> None:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    proc = subprocess.Popen([sys.executable, "-m", "scratchlm", "serve", "--model",
                             str(tiny_run), "--port", str(port), "--quantize", "int8",
                             "--api-key", "k", "--log-level", "warning"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 90
        while True:
            try:
                if httpx.get(f"{url}/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < deadline, "the server did not come up"
            time.sleep(0.2)
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="k", max_retries=0)
        card = client.models.list().data[0]
        assert card.id == Path(tiny_run).name and card.quantization.startswith("int8")
        r = client.completions.create(model=card.id, prompt="ROMEO:", max_tokens=5,
                                      temperature=0)
        assert r.usage.completion_tokens == 5
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_serve_command_refuses_a_missing_model(tmp_path: Path, capsys) -> None:
    from scratchlm.cli import main

    assert main(["serve", "--model", str(tmp_path / "nope"), "--port", "0"]) == 2
    assert capsys.readouterr().err.startswith("error: ")


def test_serve_command_refuses_a_bad_or_busy_port_before_loading(tiny_run: Path,
                                                                 capsys) -> None:
    """One `error:` line and status 2, before anything is printed or loaded (the port is
    bound first, so a busy one fails in the first second, not after the model loads)."""
    from scratchlm.cli import main

    for port in ("99999", "-1"):
        assert main(["serve", "--model", str(tiny_run), "--port", port]) == 2
        out, err = capsys.readouterr()
        assert out == "" and err == f"error: --port must be 0 to 65535 (0: any free port), " \
                                    f"got {port}\n"
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    port = busy.getsockname()[1]
    try:
        assert main(["serve", "--model", str(tiny_run), "--port", str(port)]) == 2
        out, err = capsys.readouterr()
        assert out == "" and err == f"error: port {port} is in use; choose another --port\n"
    finally:
        busy.close()


@pytest.mark.skipif(torch.cuda.is_available(), reason="half precision is refused on a CPU only")
def test_serve_command_refuses_half_precision_on_a_cpu(tiny_run: Path, capsys) -> None:
    from scratchlm.cli import main

    for mode in ("fp16", "bf16"):
        assert main(["serve", "--model", str(tiny_run), "--port", "0", "--quantize",
                     mode]) == 2
        out, err = capsys.readouterr()
        assert out == "" and err.startswith(f"error: --quantize {mode} is for a GPU")
        assert err.count("\n") == 1
