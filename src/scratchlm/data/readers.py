"""Documents from raw corpora: plain text, JSONL and Parquet, plain or gzip/zstd-compressed.

Everything streams: a text file is read in blocks, JSONL line by line, Parquet in record
batches, so memory stays flat however large the input.
"""

from __future__ import annotations

import glob
import gzip
import io
import json
import os
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from scratchlm.errors import ScratchError
from scratchlm.tokenizer.sources import iter_file_text

TEXT_SUFFIXES = {".txt", ".md", ".text"}


@dataclass
class Document:
    text: str
    source: str  # where it came from: "file.jsonl:12", "plays/hamlet.md"
    meta: dict = field(default_factory=dict)


def expand_paths(inputs: Iterable[str | os.PathLike]) -> list[Path]:
    """Files, directories (every file under them, sorted) and glob patterns -> file paths."""
    files: list[Path] = []
    for item in inputs:
        text = str(item)
        if any(ch in text for ch in "*?["):
            matches = sorted(Path(p) for p in glob.glob(text, recursive=True) if Path(p).is_file())
            if not matches:
                raise ScratchError(f"{text}: the pattern matches no file")
            files += matches
        elif Path(text).is_dir():
            found = sorted(p for p in Path(text).rglob("*")
                           if p.is_file() and not p.name.startswith("."))
            if not found:
                raise ScratchError(f"{text}: directory has no files to read")
            files += found
        elif Path(text).is_file():
            files.append(Path(text))
        else:
            raise ScratchError(f"{text}: no such file, directory or pattern; check the input")
    return files


def _kind(path: Path) -> tuple[str, str | None]:
    """(format, compression) from the file name: data.jsonl.zst -> ("jsonl", "zst")."""
    suffixes = [s.lower() for s in path.suffixes]
    compression = None
    if suffixes and suffixes[-1] in (".gz", ".zst"):
        compression = suffixes.pop()[1:]
    last = suffixes[-1] if suffixes else ""
    if last in (".jsonl", ".ndjson", ".json"):
        return "jsonl", compression
    if last == ".parquet":
        return "parquet", compression
    return "text", compression


class TruncatedError(EOFError):
    """A compressed stream ends inside a frame."""


class _ZstdReader(io.RawIOBase):
    """A zstd file's decompressed bytes, frame after frame, that fails at a cut. zstandard's
    stream_reader returns what it could decompress and then an ordinary end of file when the
    input stops inside a frame, so a truncated download would pass for a whole (shorter) one."""

    def __init__(self, path: Path) -> None:
        import zstandard

        self._file = path.open("rb")
        self._zstd = zstandard.ZstdDecompressor()
        self._frame = self._zstd.decompressobj()
        self._in_frame = False  # bytes of the current frame were fed, its end not yet seen
        self._out = memoryview(b"")  # decompressed, not yet read

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while not self._out:
            data = self._file.read(1 << 18)
            if not data:
                if self._in_frame:
                    raise TruncatedError("the zstd stream ends inside a frame")
                return 0
            self._out = memoryview(self._feed(data))
        n = min(len(buffer), len(self._out))
        buffer[:n] = self._out[:n]
        self._out = self._out[n:]  # a view: no copy of the rest
        return n

    def _feed(self, data: bytes) -> bytes:
        out = []
        while data:
            out.append(self._frame.decompress(data))
            self._in_frame = not self._frame.eof
            data = b""
            if self._frame.eof:  # the next frame starts in what this one left over
                data = self._frame.unused_data
                self._frame = self._zstd.decompressobj()
        return b"".join(out)

    def close(self) -> None:
        self._file.close()
        super().close()


def _open_text(path: Path, compression: str | None, errors: str) -> io.TextIOBase:
    if compression == "gz":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8", errors=errors)
    if compression == "zst":
        raw = io.BufferedReader(_ZstdReader(path), 1 << 18)
        return io.TextIOWrapper(raw, encoding="utf-8", errors=errors)
    return path.open("r", encoding="utf-8", errors=errors)


def _damaged_errors() -> tuple[type[BaseException], ...]:
    """What gzip and zstandard raise for a truncated or damaged stream (EOFError: gzip's cut,
    and ours; BadGzipFile is an OSError)."""
    errors: tuple[type[BaseException], ...] = (EOFError, gzip.BadGzipFile, zlib.error)
    try:
        import zstandard

        errors += (zstandard.ZstdError,)
    except ImportError:
        pass
    return errors


def _read_blocks(path: Path, compression: str, errors: str) -> Iterator[str]:
    with _open_text(path, compression, errors) as f:
        while block := f.read(1 << 20):
            yield block


def read_text_file(path: Path, compression: str | None, separator: str | None,
                   errors: str) -> Iterator[Document]:
    """One document per file, or one per `separator`-delimited part (streamed)."""
    blocks = iter_file_text(path, errors) if compression is None else \
        _read_blocks(path, compression, errors)
    try:
        if separator is None:
            yield Document("".join(blocks), str(path))
            return
        pending, k = "", 0
        for block in blocks:
            parts = (pending + block).split(separator)
            pending = parts.pop()
            for part in parts:
                yield Document(part, f"{path}:{k}")
                k += 1
        yield Document(pending, f"{path}:{k}")
    except UnicodeDecodeError as e:
        raise ScratchError(f"{path}: not valid UTF-8 ({e.reason}); convert it or pass "
                           "--errors replace") from None


def read_jsonl(path: Path, compression: str | None, text_field: str,
               errors: str) -> Iterator[Document]:
    try:
        with _open_text(path, compression, errors) as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ScratchError(f"{path}:{n}: not valid JSON ({e.msg}); fix or drop "
                                       "the line") from None
                if not isinstance(record, dict) or text_field not in record:
                    keys = sorted(record) if isinstance(record, dict) else type(record).__name__
                    raise ScratchError(f"{path}:{n}: no field {text_field!r} (found {keys}); "
                                       "set --text-field")
                text = record[text_field]
                if not isinstance(text, str):
                    raise ScratchError(f"{path}:{n}: field {text_field!r} is not a string")
                meta = {k: v for k, v in record.items() if k != text_field}
                yield Document(text, f"{path}:{n}", meta)
    except UnicodeDecodeError as e:
        raise ScratchError(f"{path}: not valid UTF-8 ({e.reason}); convert it or pass "
                           "--errors replace") from None


def read_parquet(path: Path, text_field: str) -> Iterator[Document]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for a file that is not Parquet
        raise ScratchError(f"{path}: not a readable Parquet file ({e})") from None
    if text_field not in pf.schema_arrow.names:
        raise ScratchError(f"{path}: no column {text_field!r} (found "
                           f"{pf.schema_arrow.names}); set --text-field")
    row = 0
    for batch in pf.iter_batches(batch_size=1024, columns=[text_field]):
        for text in batch.column(0).to_pylist():
            if text is not None:
                yield Document(text, f"{path}:{row}")
            row += 1


def iter_documents(
    inputs: Iterable[str | os.PathLike],
    text_field: str = "text",
    separator: str | None = None,
    errors: str = "strict",
) -> Iterator[Document]:
    """Every document of every input, in a fixed order (sorted within directories)."""
    for path in expand_paths(inputs):
        fmt, compression = _kind(path)
        try:
            if fmt == "jsonl":
                yield from read_jsonl(path, compression, text_field, errors)
            elif fmt == "parquet":
                yield from read_parquet(path, text_field)
            else:
                yield from read_text_file(path, compression, separator, errors)
        except _damaged_errors() as e:
            if compression is None:
                raise
            raise ScratchError(f"{path}: the {compression} stream is truncated or damaged "
                               f"({e}); download or compress it again") from None
