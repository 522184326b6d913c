"""Small helpers shared by every stage."""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path


def _temporary(path: Path) -> dict:
    """Where and under what name the atomic writes of `path` put their temporary (mkstemp's and
    mkdtemp's arguments): hidden, beside it, so the rename stays on one filesystem."""
    return {"dir": path.parent, "prefix": f".{path.name}.", "suffix": ".tmp"}


def stale_temporaries(path: str | os.PathLike) -> list[Path]:
    """The temporary files or directories that an atomic write of `path` (atomic_write_text,
    atomic_path, atomic_dir) leaves where its process is killed before the rename."""
    t = _temporary(Path(path))
    return list(t["dir"].glob(f"{t['prefix']}*{t['suffix']}"))


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write `text` to `path` so that readers see the old file or the new one, never half of
    one: write a temporary file in the same directory, flush it to disk, then rename it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(**_temporary(path))
    try:
        os.fchmod(fd, _file_mode())
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _file_mode() -> int:
    """The mode a new file gets from open() under the user's umask (mkstemp makes 0600)."""
    return 0o666 & ~_umask()


def data_dir() -> Path:
    """The shared reference data: $SCRATCHLM_DATA, else ../shared/data beside the project."""
    env = os.environ.get("SCRATCHLM_DATA")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[3] / "shared" / "data"  # src/scratchlm/utils.py


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path` to write to; on success it is renamed onto `path`,
    on failure removed, so `path` never holds a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(**_temporary(path))
    os.fchmod(fd, _file_mode())
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def save_tensors(tensors: dict, path: str | os.PathLike) -> Path:
    """A safetensors file, written atomically. The library reports a failed write (a full disk,
    a file-size limit) as its own error type; it is raised here as the OSError it is, so it
    reaches the user as one line like every other failed write."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    path = Path(path)
    with atomic_path(path) as tmp:
        try:
            save_file(tensors, str(tmp), metadata={"format": "pt"})
        except SafetensorError as e:
            code = re.search(r"os error (\d+)", str(e))
            if code is None:
                raise
            raise OSError(int(code.group(1)), os.strerror(int(code.group(1))), str(path)) from e
    return path


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory beside `path` to fill; on success it replaces `path` (which
    must be absent or empty unless `overwrite`), on failure it is removed: a reader sees the
    old directory or the complete new one, never a half-written one."""
    import shutil

    path = check_output_dir(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in stale_temporaries(path):  # left by a process killed mid-way
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(**_temporary(path)))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())
        old = None
        if path.exists():  # keep it until the new one is in place
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def check_output_dir(path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Refuse, before anything is written, an output directory that already holds files
    (unless `overwrite`), or a path that is a file."""
    from scratchlm.errors import ScratchError

    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ScratchError(f"{path} is a file; --out must be a directory")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise ScratchError(f"{path} already holds files; choose another --out, or pass "
                           "--overwrite to replace them")
    return path
