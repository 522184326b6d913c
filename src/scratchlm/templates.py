"""Prompt templates: how a conversation becomes token ids. The one home of the templates that
SFT trains with and that `chat`, `generate` and `serve` prompt with, so a model is always
prompted the way it was fine-tuned. A model's template is saved beside it (template.json) and
exported to Hugging Face as the tokenizer's `chat_template` (Jinja), which renders the same
text.

- `alpaca`: the Alpaca prompt that the book's instruction fine-tuning chapter uses
  ("Below is an instruction ... ### Instruction: ... ### Response:"), the response ended by
  <|endoftext|>. No new tokens.
- `chat`: role markers as special tokens, ChatML-like:
  <|system|>\\n...<|end|>\\n<|user|>\\n...<|end|>\\n<|assistant|>\\n...<|end|>\\n
  Adding it grows the tokenizer by four tokens (and the model's embedding with them).

A conversation is a list of {"role": "system" | "user" | "assistant", "content": str}.
`encode` returns the ids and, for training, which of them are the assistant's (the loss is on
those by default). The text between special tokens is encoded in one run, so the ids equal
those of the whole rendered string (what Hugging Face's tokenizer produces); message content
is always plain text, never special tokens, whatever it holds.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from scratchlm.errors import ScratchError
from scratchlm.utils import atomic_write_text

ROLES = ("system", "user", "assistant")
EOT = "<|endoftext|>"
ALPACA_PREAMBLE = ("Below is an instruction that describes a task. Write a response that "
                   "appropriately completes the request.")
TEMPLATE_FILE = "template.json"


@dataclass(frozen=True)
class Template:
    name: str
    special_tokens: tuple[str, ...]
    """Tokens the tokenizer must have (added by SFT when missing)."""
    end: str
    """Ends an assistant turn: generation stops at it."""
    jinja: str
    """The same template for Hugging Face's tokenizer.apply_chat_template."""

    def pieces(self, messages: list[dict], add_generation_prompt: bool = False
               ) -> list[tuple[str, bool, bool]]:
        """The rendered conversation as pieces: (text, a special token?, the assistant's?)."""
        check_messages(messages, self)
        if self.name == "alpaca":
            return self._alpaca(messages, add_generation_prompt)
        out: list[tuple[str, bool, bool]] = []
        for m in messages:
            mine = m["role"] == "assistant"
            out += [(f"<|{m['role']}|>", True, False), ("\n", False, False),
                    (m["content"], False, mine), (self.end, True, mine), ("\n", False, False)]
        if add_generation_prompt:
            out += [("<|assistant|>", True, False), ("\n", False, False)]
        return out

    def _alpaca(self, messages: list[dict], add_generation_prompt: bool
                ) -> list[tuple[str, bool, bool]]:
        system = messages[0]["content"] if messages[0]["role"] == "system" else ALPACA_PREAMBLE
        out: list[tuple[str, bool, bool]] = [(system, False, False)]
        for m in messages:
            if m["role"] == "user":
                out += [("\n\n### Instruction:\n", False, False), (m["content"], False, False),
                        ("\n\n### Response:\n", False, False)]
            elif m["role"] == "assistant":
                out += [(m["content"], False, True), (self.end, True, True)]
        if not add_generation_prompt and messages[-1]["role"] == "user":
            out.pop()  # no response header after a final user turn unless asked for one
        return out

    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        return "".join(text for text, _, _ in self.pieces(messages, add_generation_prompt))

    def encode(self, tokenizer, messages: list[dict], add_generation_prompt: bool = False
               ) -> tuple[list[int], list[bool]]:
        """(ids, for each id whether it is the assistant's: content and end-of-turn token)."""
        missing = [t for t in self.special_tokens if t not in tokenizer.special_tokens]
        if missing:
            raise ScratchError(f"the tokenizer lacks the {self.name} template's token "
                               f"{missing[0]!r}; fine-tune with --template {self.name} first "
                               "(it adds them)")
        ids: list[int] = []
        mask: list[bool] = []
        run: list[tuple[bytes, bool]] = []  # plain text since the last special token

        def flush() -> None:
            data = b"".join(b for b, _ in run)
            trained_bytes = [t for b, t in run for _ in range(len(b))]
            start = 0
            for token in tokenizer.encode(data.decode("utf-8"), disallowed_special=()):
                ids.append(token)
                mask.append(trained_bytes[start])  # a token belongs where it starts
                start += len(tokenizer.token_bytes(token))
            run.clear()

        for text, special, trained in self.pieces(messages, add_generation_prompt):
            if special:
                flush()
                ids.append(tokenizer.special_tokens[text])
                mask.append(trained)
            elif text:
                run.append((text.encode("utf-8"), trained))
        flush()
        return ids, mask

    def stop_ids(self, tokenizer) -> list[int]:
        """Token ids that end a reply: the end-of-turn token, and <|endoftext|>."""
        return sorted({tokenizer.special_tokens[t] for t in (self.end, EOT)
                       if t in tokenizer.special_tokens})

    def to_dict(self) -> dict:
        return {"format": "scratchlm-template", "version": 1, "name": self.name}


def check_messages(messages: list[dict], template: Template | None = None) -> None:
    """A conversation must be non-empty, with known roles and string contents, and end with a
    user or assistant turn."""
    if not isinstance(messages, list) or not messages:
        raise ScratchError("a conversation needs at least one message")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ScratchError(f"message {i + 1} must be an object with 'role' and 'content'")
        if m["role"] not in ROLES:
            raise ScratchError(f"message {i + 1} has role {m['role']!r}; the "
                               f"{template.name if template else 'chat'} template knows "
                               f"{', '.join(ROLES)}")
        if not isinstance(m["content"], str):
            raise ScratchError(f"message {i + 1}: content must be a string")
        if m["role"] == "system" and i > 0:
            raise ScratchError(f"message {i + 1}: a system message may only come first")


_CHAT_JINJA = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}")

_ALPACA_JINJA = (
    "{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] }}"
    "{% else %}{{ '" + ALPACA_PREAMBLE + "' }}{% endif %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}"
    "{{ '\n\n### Instruction:\n' + message['content'] }}"
    "{% if not loop.last or add_generation_prompt %}{{ '\n\n### Response:\n' }}{% endif %}"
    "{% elif message['role'] == 'assistant' %}"
    "{{ message['content'] + '" + EOT + "' }}"
    "{% endif %}{% endfor %}")

TEMPLATES = {
    "alpaca": Template("alpaca", (EOT,), EOT, _ALPACA_JINJA),
    "chat": Template("chat", ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>"), "<|end|>",
                     _CHAT_JINJA),
}


def get_template(name: str) -> Template:
    if name not in TEMPLATES:
        raise ScratchError(f"no template {name!r}; choose from {', '.join(TEMPLATES)}")
    return TEMPLATES[name]


def save_template(template: Template, directory: str | os.PathLike) -> None:
    atomic_write_text(Path(directory) / TEMPLATE_FILE, json.dumps(template.to_dict(), indent=2))


def load_template(directory: str | os.PathLike) -> Template | None:
    """The template a model was fine-tuned with (None for a base model)."""
    path = Path(directory) / TEMPLATE_FILE
    if not path.is_file():
        return None
    try:
        name = json.loads(path.read_text(encoding="utf-8"))["name"]
    except (json.JSONDecodeError, KeyError, UnicodeDecodeError):
        raise ScratchError(f"{path}: unreadable template file; the model directory is "
                           "damaged") from None
    return get_template(name)


def alpaca_messages(instruction: str, input_text: str = "", output: str | None = None
                    ) -> list[dict]:
    """An Alpaca record as a conversation: the input, when there is one, goes under its own
    "### Input:" heading inside the instruction turn, as in the book."""
    content = instruction + (f"\n\n### Input:\n{input_text}" if input_text else "")
    messages = [{"role": "user", "content": content}]
    if output is not None:
        messages.append({"role": "assistant", "content": output})
    return messages
