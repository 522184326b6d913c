"""Streaming text from files, strings and iterables, with byte-exact errors for bad UTF-8.

Tokenizer training and the data pipeline read corpora far larger than memory, so a file is read
in blocks of whole lines and never held entirely in memory.
"""

from __future__ import annotations

import codecs
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

from scratchlm.errors import ScratchError

Source = str | os.PathLike | Iterable[str]
BLOCK_BYTES = 1 << 20  # 1 MiB of text per block: large enough to amortise regex calls


def _safe_cut(text: str) -> int:
    """The end of the last line that is followed by a non-space character, or 0.

    The split regexes glue runs of whitespace (e.g. "\n\n") into one chunk, so a block may only
    end where no chunk can continue: after a line break whose next character is not a space.
    """
    end = len(text)
    while (pos := text.rfind("\n", 0, end)) >= 0:
        if pos + 1 < len(text) and not text[pos + 1].isspace():
            return pos + 1
        end = pos
    return 0


def iter_file_text(path: str | os.PathLike, errors: str = "strict") -> Iterator[str]:
    """Yield a UTF-8 file's text in blocks that end on a line break, cut where the built-in
    split patterns give the same chunks as for the whole file.

    `errors="strict"` raises a ScratchError naming the file and the byte offset of the first
    invalid byte; `errors="replace"` substitutes U+FFFD and carries on.
    """
    path = Path(path)
    if not path.is_file():
        raise ScratchError(f"{path}: no such file; check the path (directories are not read here)")
    decoder = codecs.getincrementaldecoder("utf-8")(errors=errors)
    offset = 0  # bytes of the file decoded before the current block
    pending = ""  # text after the last line break, carried to the next block
    with path.open("rb") as f:
        while True:
            raw = f.read(BLOCK_BYTES)
            # The decoder holds back the bytes of an unfinished character; an error's position
            # counts from those bytes, which precede `offset`.
            held = len(decoder.getstate()[0])
            try:
                text = decoder.decode(raw, final=not raw)
            except UnicodeDecodeError as e:
                raise ScratchError(
                    f"{path}: not valid UTF-8 at byte offset {offset - held + e.start}; "
                    "convert the file to UTF-8 or pass --errors replace"
                ) from None
            offset += len(raw)
            text = pending + text
            if not raw:
                if text:
                    yield text
                return
            cut = _safe_cut(text)
            pending = text[cut:]
            if cut:
                yield text[:cut]


def iter_source_text(sources: Source | Iterable[Source], errors: str = "strict") -> Iterator[str]:
    """Yield text from each source: a `str` is text itself, a `PathLike` is a file to stream,
    and any other iterable is a stream of strings (or of further sources)."""
    if isinstance(sources, str):
        yield sources
    elif isinstance(sources, os.PathLike):
        yield from iter_file_text(sources, errors)
    else:
        for source in sources:
            yield from iter_source_text(source, errors)
