"""The server's engine: one thread owns the model and runs a continuous batch.

Requests from the web workers (the asyncio event loop) hand their generations to `submit`
with a sink; the engine thread admits them into the running batch between two decoding steps
(scratchlm.generate.BatchGenerator), so requests that arrive while others run share their
forward passes. Every new token goes back to its sink as an `Event`. Work that needs the model
but is no generation (prompt log-probs for `echo`) runs on the same thread through `call`.
Whatever raises on the engine thread (a generation refused at admission, a failing step, a bug)
ends the generations it concerns with finish_reason "error" and a one-line message, and the
engine goes on serving the rest: the thread never dies with requests waiting on it.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass

import torch

from scratchlm.errors import ScratchError
from scratchlm.generate import BatchGenerator, Generation
from scratchlm.model.gpt import GPT
from scratchlm.model.logprobs import token_logprobs

log = logging.getLogger("scratchlm.serve")


class Overloaded(Exception):
    """More generations in flight than the engine accepts (HTTP 429)."""


class NotRunning(Exception):
    """The engine's thread is not running (HTTP 503): nothing submitted would ever finish."""


@dataclass(frozen=True)
class Event:
    """What one step did to one generation, copied out of it on the engine thread."""

    text: str
    token: int | None
    """The new token (None when the generation ended without one: cancelled, error)."""
    logprob: tuple[float, list[tuple[int, float]]] | None
    finish_reason: str | None
    error: str | None = None


Sink = Callable[[Generation, Event], None]


class Engine:
    def __init__(self, model: GPT, max_batch: int = 16, max_pending: int = 64,
                 use_kv_cache: bool = True) -> None:
        self.model = model
        self.batcher = BatchGenerator(model, max_batch, use_kv_cache)
        self.max_batch, self.max_pending = max_batch, max_pending
        self.stats: Counter[str] = Counter()
        """Finished generations by finish_reason, "tokens" generated, and "peak_running": the
        most generations that got a token from one step."""
        self._cond = threading.Condition()
        self._incoming: list[tuple[Generation, Sink]] = []
        self._calls: list[tuple[Callable[[], object], Future]] = []
        self._live: dict[int, tuple[Generation, Sink]] = {}
        """Every generation admitted and not yet given its final event, by id."""
        self._pending = 0
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="scratchlm-engine", daemon=True)

    # -------------------------------------------------------------------------- the web side

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify()
        self._thread.join(timeout=10)

    @property
    def pending(self) -> int:
        """Generations submitted and not finished: running or waiting for a row."""
        return self._pending

    @property
    def running(self) -> int:
        return len(self.batcher.running)

    @property
    def alive(self) -> bool:
        """The engine thread is serving (started, not stopped, not dead)."""
        return self._thread.is_alive() and not self._stop

    def submit(self, gens: list[Generation], sink: Sink) -> None:
        """Queue generations (all of them or none); raises Overloaded past max_pending and
        NotRunning when no thread would ever run them."""
        with self._cond:
            if not self.alive:
                raise NotRunning("the server's generation engine is not running; restart the "
                                 "server (its log says why it stopped)")
            if self._pending + len(gens) > self.max_pending:
                raise Overloaded(f"{self._pending} generations are in flight and this server "
                                 f"takes at most {self.max_pending}; retry shortly")
            self._pending += len(gens)
            self._incoming += [(g, sink) for g in gens]
            self._cond.notify()

    def call(self, fn: Callable[[], object]) -> Future:
        """Run fn() on the engine thread between two steps; its result comes in the future."""
        fut: Future = Future()
        with self._cond:
            self._calls.append((fn, fut))
            self._cond.notify()
        return fut

    def prompt_logprobs(self, ids: list[int], top: int) -> Future:
        """The log-probability of each prompt token after the first, and the `top` most likely
        tokens at each of those positions: [(logprob, [(id, logprob), ...])] * (len(ids) - 1).
        One sequence per forward pass, unpadded: exactly what the model gives it alone."""
        def run() -> list[tuple[float, list[tuple[int, float]]]]:
            with torch.inference_mode():
                x = torch.tensor([ids], device=self.batcher.device)
                logits, _ = self.model(x)  # (1, P, vocab)
                chosen = token_logprobs(logits[:, :-1], x[:, 1:])[0].tolist()  # (P - 1,)
                if not top:
                    return [(lp, []) for lp in chosen]
                best = logits[0, :-1].float().log_softmax(-1).topk(top)  # (P - 1, top)
                return [(lp, list(zip(i, v))) for lp, i, v in
                        zip(chosen, best.indices.tolist(), best.values.tolist())]
        return self.call(run)

    # -------------------------------------------------------------------------- the engine thread

    def _run(self) -> None:
        while True:
            with self._cond:
                while not (self._incoming or self._calls or self.batcher.busy() or self._stop):
                    self._cond.wait()
                if self._stop:
                    return
                incoming, self._incoming = self._incoming, []
                calls, self._calls = self._calls, []
            try:
                self._serve(calls, incoming)
            except Exception as e:  # a bug, not a request: end what is in flight, keep serving
                log.exception("the engine failed; the generations in flight end with an error")
                self._fail_all(f"the server failed while generating ({one_line(e)}); "
                               "see its log")

    def _serve(self, calls: list[tuple[Callable[[], object], Future]],
               incoming: list[tuple[Generation, Sink]]) -> None:
        """One turn of the engine: calls, then admissions, then one decoding step."""
        for fn, fut in calls:
            try:
                fut.set_result(fn())
            except Exception as e:  # noqa: BLE001 - handed to the waiting request
                fut.set_exception(e)
        for gen, sink in incoming:
            self._live[id(gen)] = (gen, sink)
            try:
                self.batcher.submit(gen)
            except Exception as e:  # noqa: BLE001 - this request fails, the others go on
                if not isinstance(e, ScratchError):
                    log.exception("a generation could not be admitted")
                gen.finish_reason = "error"
                self._emit(gen, "", new_token=False, error=one_line(e) if isinstance(
                    e, ScratchError) else f"the server failed ({one_line(e)}); see its log")
        if not self.batcher.busy():
            return
        events = [(g, piece, g.finish_reason not in ("cancelled",))
                  for g, piece in self.batcher.step()]
        advanced = sum(new_token for _, _, new_token in events)
        self.stats["peak_running"] = max(self.stats["peak_running"], advanced)
        for gen, piece, new_token in events:
            self._emit(gen, piece, new_token)

    def _fail_all(self, message: str) -> None:
        """End every live generation with an error: those of the failed step, and any that
        finished in it before the failure (their last event was never sent)."""
        try:
            self.batcher.fail_all()
        except Exception:  # noqa: BLE001 - the live generations below still get their end
            log.exception("resetting the batch failed")
        for gen, _ in list(self._live.values()):
            gen.finish_reason = "error"
            self._emit(gen, "", new_token=False, error=message)

    def _emit(self, gen: Generation, piece: str, new_token: bool,
              error: str | None = None) -> None:
        if id(gen) not in self._live:  # its final event has been sent already
            return
        if gen.finish_reason == "error" and error is None:
            error = "the server failed while generating; see its log"
        new_token = new_token and gen.finish_reason != "error" and bool(gen.tokens)
        event = Event(piece, gen.tokens[-1] if new_token else None,
                      gen.token_logprobs[-1] if new_token and gen.logprobs is not None
                      else None, gen.finish_reason, error)
        if new_token:
            self.stats["tokens"] += 1
        _, sink = self._live[id(gen)]
        if gen.finish_reason is not None:
            del self._live[id(gen)]
            self.stats[gen.finish_reason] += 1
            with self._cond:
                self._pending -= 1
        try:
            sink(gen, event)
        except Exception:  # noqa: BLE001 - a request that went away must not stop the engine
            log.debug("dropped an event for a request that is gone", exc_info=True)


def one_line(e: BaseException) -> str:
    """An exception as one line for a client: a ScratchError's message, else its type and the
    first line of its message."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    if isinstance(e, ScratchError):
        return text or type(e).__name__
    return f"{type(e).__name__}: {text}" if text else type(e).__name__
