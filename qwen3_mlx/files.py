"""Files written whole or not at all, and sizes as people read them: one rule each, for every writer
(batch results, cache files, converted checkpoints) and every message."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path


def human_size(n: int | float) -> str:
    """Bytes in decimal units, as the options that take them (--kv-memory GB): "1.50 GB", "12.0 MB"."""
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


@contextlib.contextmanager
def written_atomically(path: Path, suffix: str = "") -> Iterator[Path]:
    """A temporary path beside `path` to write a file or a folder into; when the block ends well, it is
    renamed into place (an old `path` is moved aside first and deleted last), so readers see the old
    one or the new one, never half of one. On any failure, Ctrl-C included, the temporary is removed.
    `suffix` ends the temporary's name (for writers that add their own, as MLX adds .safetensors)."""
    path = Path(path)
    tmp = path.parent / f".{path.name}.tmp-{secrets.token_hex(4)}{suffix}"
    try:
        yield tmp
        _replace(tmp, path)
    finally:
        _remove(tmp)


def _replace(tmp: Path, out: Path) -> None:
    if tmp.is_file():  # a file: one rename replaces it
        os.replace(tmp, out)
        return
    old = None
    if out.exists() or out.is_symlink():
        old = out.parent / f".{out.name}.old-{secrets.token_hex(4)}"
        os.rename(out, old)
    try:
        os.rename(tmp, out)
    except BaseException:
        if old is not None:
            os.rename(old, out)
        raise
    if old is not None:
        _remove(old)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        with contextlib.suppress(OSError):
            path.unlink()
