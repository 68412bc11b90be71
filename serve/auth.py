"""API keys: kept as sha256 hashes at rest, presented as ``Authorization: Bearer KEY``.

A key file holds one ``sha256:<hex>`` per line (``#`` starts a comment, a name may follow the
hash); ``earmark api-key FILE`` makes a key, prints it once and appends its hash. Browsers
cannot set headers on a WebSocket, so a key may also come as the subprotocol
``openai-insecure-api-key.KEY`` (OpenAI's convention).

>>> key = new_key()
>>> keys = ApiKeys((hash_key(key),))
>>> keys.allows(key), keys.allows("em-wrong")
(True, False)
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

PREFIX = "sha256:"
#: WebSocket subprotocol that carries a key in browsers (after ``realtime``).
SUBPROTOCOL_PREFIX = "openai-insecure-api-key."


class KeyFileError(ValueError):
    pass


def new_key() -> str:
    """A fresh random API key (``em-`` and 43 URL-safe characters, 256 bits)."""
    return "em-" + secrets.token_urlsafe(32)


def hash_key(key: str) -> str:
    return PREFIX + hashlib.sha256(key.encode()).hexdigest()


def read_key_file(path: str | Path) -> tuple[str, ...]:
    """The hashes in a key file; a line that is not a hash is an error naming the line."""
    path = Path(path)
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise KeyFileError(
            f"{path}: cannot read the API key file ({exc.strerror}); make one with `earmark api-key FILE`"
        ) from exc
    hashes = []
    for number, line in enumerate(lines, 1):
        text = line.split("#", 1)[0].strip()
        if not text:
            continue
        value = text.split()[0]
        digest = value[len(PREFIX) :]
        if not value.startswith(PREFIX) or len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise KeyFileError(
                f"{path}:{number}: expected 'sha256:<64 hex digits>' (keys are stored hashed; "
                "make one with `earmark api-key FILE`)"
            )
        hashes.append(value)
    if not hashes:
        raise KeyFileError(f"{path}: holds no key; add one with `earmark api-key {path}`")
    return tuple(hashes)


def append_key(path: str | Path, name: str | None = None) -> str:
    """Make a key, append its hash (and ``name``) to ``path``; returns the key (shown once)."""
    key = new_key()
    path = Path(path)
    line = hash_key(key) + (f"  # {name}" if name else "") + "\n"
    with path.open("a") as f:
        f.write(line)
    path.chmod(0o600)
    return key


@dataclass(frozen=True, slots=True)
class ApiKeys:
    hashes: tuple[str, ...]

    @property
    def required(self) -> bool:
        return bool(self.hashes)

    def allows(self, key: str | None) -> bool:
        if not self.required:
            return True
        if not key:
            return False
        presented = hash_key(key)
        return any(hmac.compare_digest(presented, h) for h in self.hashes)

    def key_of(self, authorization: str | None, subprotocols: Iterable[str] = ()) -> str | None:
        """The key a request presents: ``Bearer KEY``, else a ``openai-insecure-api-key.KEY`` subprotocol."""
        if authorization:
            scheme, _, value = authorization.partition(" ")
            if scheme.lower() == "bearer" and value.strip():
                return value.strip()
        for proto in subprotocols:
            if proto.startswith(SUBPROTOCOL_PREFIX):
                return proto[len(SUBPROTOCOL_PREFIX) :]
        return None
