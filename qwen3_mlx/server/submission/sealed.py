"""Reasoning a client carries back for us: Anthropic's thinking `signature` and the Responses API's
`encrypted_content` hold the reasoning itself, compressed and authenticated under the server's key, so
that an agent that shows none of it (Claude Code's display "omitted", Codex's encrypted reasoning) sends
it back on the next request and the model reads its own reasoning again, as its chat template keeps it
during a tool loop. One altered, or sealed under another server's key, is not ours: it is ignored.

    seal(text, key)  "q3m1." + base64url(HMAC-SHA256(key, body)[:16] + body), body = zlib(text)

The key is 32 random bytes in a file (`serve --secret-key-file`), by default created once under the
user's cache folder so that what a client holds survives a restart.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import secrets
import zlib
from pathlib import Path

from ...errors import Qwen3Error

PREFIX = "q3m1."  # the format's version: a later one is told apart, never misread
_MAC_BYTES = 16
_MOST_BYTES = 16 << 20  # the longest reasoning unsealed (a sealed one is bounded by the body's size already)


def seal(text: str, key: bytes) -> str:
    """`text`, compressed and authenticated under `key`, as opaque ASCII."""
    body = zlib.compress(text.encode(), 9)
    mac = hmac.new(key, body, hashlib.sha256).digest()[:_MAC_BYTES]
    return PREFIX + base64.urlsafe_b64encode(mac + body).decode().rstrip("=")


def unseal(token: object, key: bytes) -> str | None:
    """The text `token` seals under `key`; None for anything else (another server's, altered, not ours)."""
    if not isinstance(token, str) or not token.startswith(PREFIX):
        return None
    data = token[len(PREFIX):]
    try:
        raw = base64.urlsafe_b64decode(data + "=" * (-len(data) % 4))
    except (binascii.Error, ValueError):
        return None
    mac, body = raw[:_MAC_BYTES], raw[_MAC_BYTES:]
    if not hmac.compare_digest(mac, hmac.new(key, body, hashlib.sha256).digest()[:_MAC_BYTES]):
        return None
    inflate = zlib.decompressobj()
    try:
        text = inflate.decompress(body, _MOST_BYTES)
        return None if inflate.unconsumed_tail else text.decode()
    except (zlib.error, UnicodeDecodeError):
        return None


def default_key_file() -> Path:
    """Where the key lives when serve is given none: the user's cache folder ($XDG_CACHE_HOME or ~/.cache)."""
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "qwen3-mlx" / "secret-key"


def load_key(path: str | Path | None = None) -> bytes:
    """The server's key, read from `path`; with no path, the default file's, created once (readable by
    the user alone) when it does not exist yet.

    Raises:
        Qwen3Error: the file cannot be read, or holds fewer than 16 bytes.
    """
    file = Path(path) if path is not None else default_key_file()
    if path is None and not file.exists():
        _create(file)
    try:
        key = file.read_bytes().strip()
    except OSError as e:
        raise Qwen3Error(f"--secret-key-file {file}: cannot read it ({e.strerror or e})") from None
    if len(key) < 16:
        raise Qwen3Error(f"--secret-key-file {file}: a key needs 16 bytes or more, got {len(key)}; write 32 random "
                         "bytes (say, `openssl rand -hex 32 > FILE`)")
    return key


def _create(file: Path) -> None:
    """A new key in `file`, whole or not at all; when two servers start at once, the first one's stays."""
    file.parent.mkdir(parents=True, exist_ok=True)
    tmp = file.parent / f".{file.name}.tmp-{secrets.token_hex(4)}"
    try:
        tmp.write_text(secrets.token_hex(32) + "\n")
        tmp.chmod(0o600)
        os.link(tmp, file)  # fails if the file is there: the key others may already use is kept
    except FileExistsError:
        pass
    finally:
        tmp.unlink(missing_ok=True)
