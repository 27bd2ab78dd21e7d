"""Reading every file the settings name, as serving would, before serving.

``moorage check-config`` and ``moorage serve`` both call :func:`file_problems`, so a settings
file that passes the check does not fail at start on a certificate, an htpasswd or groups file,
a token signing key, an upstream's password file or the store directory. It reads what serving
reads and nothing more (the token key only where there are users), and reports one
``key: what is wrong`` line per setting (within a setting, its first problem: a groups file is
read once its htpasswd file is good). Blocking (it reads files).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from functools import partial
from pathlib import Path

from moorage.config import ConfigError, Settings
from moorage.upstreams import read_password

from ._auth import Htpasswd
from ._tls import ServerTls
from ._tokens import TokenKeys

__all__ = ["file_problems", "policy_warnings"]


def file_problems(settings: Settings) -> list[str]:
    """What serving these settings would refuse in the files they name; empty when nothing."""
    problems: list[str] = []
    tls, auth = settings.tls, settings.auth
    if tls is not None:
        _collect(problems, partial(ServerTls, tls))
    htpasswd_file = auth.htpasswd_file
    if htpasswd_file is not None:
        _collect(problems, partial(_read_users, htpasswd_file, auth.groups_file))
    # As serving does: the key signs tokens only for users; unset, the store's own is used
    # (generated at the first start, so only checked once it exists).
    key = auth.token_signing_key_file or settings.storage.path / "auth" / "token-key.pem"
    if htpasswd_file is not None and (auth.token_signing_key_file is not None or key.exists()):
        try:
            TokenKeys.load(key, create=False)
        except ValueError as exc:
            problems.append(f"auth.token_signing_key_file: {exc}")
    for index, upstream in enumerate(settings.upstreams):
        _collect(problems, partial(read_password, index, upstream))
    store = _store_problem(settings.storage.path)
    if store is not None:
        problems.append(f"storage.path: {store}")
    return problems


def policy_warnings(settings: Settings) -> list[str]:
    """Policy rules naming users or groups the files do not: valid settings (the files are
    reloaded while serving, and may gain them), but most likely a typo that refuses the pulls
    the rule was written for. Empty when the files cannot be read (reported as problems)."""
    auth = settings.auth
    if not auth.policy:
        return []
    if auth.htpasswd_file is None:
        named = [i for i, rule in enumerate(auth.policy) if rule.users or rule.groups]
        return [f"auth.policy[{i}]: names users or groups, but there is no auth.htpasswd_file" for i in named]
    try:
        users = Htpasswd(auth.htpasswd_file, auth.groups_file)
    except ConfigError:
        return []
    users.executor.shutdown()
    known_users, known_groups = users.names()
    warnings = []
    for index, rule in enumerate(auth.policy):
        for user in rule.users:
            if user != "*" and user not in known_users:
                warnings.append(f"auth.policy[{index}].users: {user!r} is not in {auth.htpasswd_file}")
        for group in rule.groups:
            if group not in known_groups:
                where = auth.groups_file or "auth.groups_file (not set)"
                warnings.append(f"auth.policy[{index}].groups: {group!r} has no member in {where}")
    return warnings


def _collect(problems: list[str], read: Callable[[], object]) -> None:
    try:
        read()
    except ConfigError as error:
        problems.extend(error.problems)


def _read_users(htpasswd_file: Path, groups_file: Path | None) -> None:
    Htpasswd(htpasswd_file, groups_file).executor.shutdown()


def _store_problem(path: Path) -> str | None:
    """Why ``path`` cannot hold the store (it is created at start if missing), or None."""
    if path.exists():
        if not path.is_dir():
            return f"{path} is not a directory"
        return None if os.access(path, os.W_OK | os.X_OK) else f"{path} is not writable"
    parent = path.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        return f"cannot create {path}: {parent} is not a directory"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"cannot create {path}: {parent} is not writable"
    return None
