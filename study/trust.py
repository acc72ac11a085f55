"""Which stores may make this process import code.

A store's ``env`` may name a module (gymnasium's ``module:EnvName-v0``), and building
that environment imports the module: it runs its code. Stores are shared between
people, so a command that builds a store's environment (``study.report.render``) imports such a
module only from a store this user made on this machine, or with ``--trust``.

"Made here" is checked, not assumed: drivers sign the env id of the stores they write
(``env_signature`` in ``manifest.json``, an HMAC-SHA256 under a random key kept in
:func:`key_path`, readable by this user only). A store from elsewhere carries no valid
signature, and one cannot be forged without the key. The readers (``study.tables``,
``study.failures``, ``study.report``) read data only and never import a store's module.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path
from typing import Any

from study.config import ConfigError

__all__ = ["env_module", "key_path", "require_trust", "sign_env"]

#: Overrides the key's location (tests; several users sharing one home).
KEY_ENV = "STUDY_KEY_FILE"


def env_module(env_id: str) -> str | None:
    """The module an env id imports (``"pkg.mod"`` for ``"pkg.mod:Env-v0"``), else None."""
    return env_id.split(":", 1)[0] if ":" in env_id else None


def key_path() -> Path:
    """``$STUDY_KEY_FILE``, else ``$XDG_STATE_HOME/study/key``, else
    ``~/.local/state/study/key``."""
    if os.environ.get(KEY_ENV):
        return Path(os.environ[KEY_ENV])
    state = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(state) / "study" / "key"


def _key(create: bool) -> bytes | None:
    path = key_path()
    try:
        return bytes.fromhex(path.read_text().strip())
    except (OSError, ValueError):
        if not create:
            return None
    try:  # first use: 32 random bytes, created exclusively, this user only
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32) + "\n")
        return bytes.fromhex(path.read_text().strip())
    except (OSError, ValueError):  # read-only home, a race lost to a corrupt file
        return _key(create=False)


def _sign(key: bytes, env_id: str) -> str:
    return hmac.new(key, env_id.encode(), hashlib.sha256).hexdigest()


def sign_env(env_id: str) -> str | None:
    """The signature a driver records for ``env_id`` (None for ids that import no
    module, or when no key can be kept)."""
    if env_module(env_id) is None:
        return None
    key = _key(create=True)
    return None if key is None else _sign(key, env_id)


def require_trust(root: Path, manifest: dict[str, Any], env_id: str, trust: bool) -> None:
    """ConfigError unless building ``env_id`` for the store at ``root`` may import its
    module: the id names none, ``trust`` is set, or the store was signed here."""
    module = env_module(env_id)
    if module is None or trust:
        return
    key = _key(create=False)
    # One signature per env id (a sweep over several envs signs each of them).
    others = manifest.get("env_signatures")
    candidates = [manifest.get("env_signature"),
                  *(others.values() if isinstance(others, dict) else ())]
    if key is not None and any(isinstance(c, str) and hmac.compare_digest(c, _sign(key, env_id))
                               for c in candidates):
        return
    raise ConfigError(
        f"{root}: its env {env_id!r} imports the Python module {module!r}, and this store "
        f"was not made by this user on this machine; importing it runs that module's code. "
        f"Pass --trust if you trust where the store came from")
