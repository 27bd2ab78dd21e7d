"""Reading every file the settings name, as serving would, before serving.

``moorage check-config`` and ``moorage serve`` both call :func:`preflight`, so a settings
file that passes the check does not fail at start on a certificate, an htpasswd or groups file,
a token signing key, an upstream's password file, the store directory or the environment's
outbound proxy. It reads what serving
reads and nothing more (the token key only where there are users), and reports one
``key: what is wrong`` line per setting (within a setting, its first problem: a groups file is
read once its htpasswd file is good). It also returns warnings: access policy rules that name
users, groups or registries these settings and files do not. Blocking (it reads files).
:func:`routing_warnings` says what the settings alone leave unrouted.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from functools import partial
from pathlib import Path

from moorage.cache import index_files, index_problem
from moorage.config import ConfigError, Settings
from moorage.upstreams import ProxyEnvironment, read_password, trust_for

from ._auth import Htpasswd
from ._tls import ServerTls
from ._tokens import TokenKeys, key_path

__all__ = ["policy_warnings", "preflight", "routing_warnings"]


def preflight(settings: Settings) -> tuple[list[str], list[str]]:
    """(what serving these settings would refuse in the files they name, what in them is
    doubtful: :func:`policy_warnings`); each empty when nothing. The user files are read once."""
    problems, users = _file_problems(settings)
    return problems, policy_warnings(settings, users)


def _file_problems(settings: Settings) -> tuple[list[str], Htpasswd | None]:
    problems: list[str] = []
    tls, auth = settings.tls, settings.auth
    if tls is not None:
        _collect(problems, partial(ServerTls, tls))
    htpasswd_file = auth.htpasswd_file
    users = None
    if htpasswd_file is not None:
        try:
            users = Htpasswd(htpasswd_file, auth.groups_file)
        except ConfigError as error:
            problems.extend(error.problems)
        else:
            users.executor.shutdown()
    # As serving does: the key signs tokens only for users; unset, the store's own is used
    # (generated at the first start, so only checked once it exists).
    key = key_path(settings)
    if htpasswd_file is not None and (auth.token_signing_key_file is not None or key.exists()):
        try:
            TokenKeys.load(key, create=False)
        except ValueError as exc:
            problems.append(f"auth.token_signing_key_file: {exc}")
    _collect(problems, ProxyEnvironment.read)  # the outbound proxy serving would use
    for index, upstream in enumerate(settings.upstreams):
        _collect(problems, partial(read_password, index, upstream, warn=False))  # serving warns
        _collect(problems, partial(trust_for, index, upstream))
    store = _store_problem(settings.storage.path)
    if store is not None:
        problems.append(f"storage.path: {store}")
    return problems, users


def policy_warnings(settings: Settings, users: Htpasswd | None) -> list[str]:
    """Policy rules naming users or groups the files do not, or a registry host that is no
    upstream here: valid settings (the files are reloaded while serving and may gain them; a
    policy may be shared by caches with other upstreams), but most likely a typo that refuses
    the pulls the rule was written for. Users and groups are not judged when the files cannot
    be read (reported as problems)."""
    auth = settings.auth
    if not auth.policy:
        return []
    hosts = {upstream.host for upstream in settings.upstreams}
    elsewhere = [
        f"auth.policy[{index}].repositories: {glob!r} names {head!r}, which is no upstream here"
        for index, rule in enumerate(auth.policy)
        for glob, head in rule.named_registries()
        if head not in hosts
    ]
    return elsewhere + _name_warnings(settings, users)


def routing_warnings(settings: Settings) -> list[str]:
    """Routes these settings leave to nothing: with no default upstream, a path that names no
    prefix and comes without ``ns`` (Docker's ``registry-mirrors``, ``docker pull
    cache:5000/library/alpine``) gets 404, and a Docker daemon then pulls past the cache."""
    if settings.default_host is not None:
        return []
    return [
        "upstreams: none has default: true, so a path without a prefix or ns (Docker's "
        "registry-mirrors) gets 404 and Docker pulls past the cache; set default: true on the "
        "docker.io entry if Docker daemons use this cache"
    ]


def _name_warnings(settings: Settings, users: Htpasswd | None) -> list[str]:
    auth = settings.auth
    if auth.htpasswd_file is None:
        named = [i for i, rule in enumerate(auth.policy) if rule.users or rule.groups]
        return [f"auth.policy[{i}]: names users or groups, but there is no auth.htpasswd_file" for i in named]
    if users is None:  # the files could not be read: reported as problems
        return []
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


def _read_only(path: Path) -> str:
    """Why a path the daemon's user may write is not writable all the same: a file system
    mounted read-only (a chown would not help)."""
    try:
        read_only = bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return ""
    return ": its file system is mounted read-only" if read_only else ""


def _store_problem(path: Path) -> str | None:
    """Why ``path`` cannot hold the store (it is created at start if missing), or None."""
    if path.exists():
        if not path.is_dir():
            return f"{path} is not a directory"
        for part in (path, *index_files(path)):  # a store made by another user
            if part.exists() and not os.access(part, os.W_OK | (os.X_OK if part.is_dir() else 0)):
                return f"{part} is not writable{_read_only(part)}"
        return index_problem(path)  # a later version's store, a damaged index
    parent = path.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        return f"cannot create {path}: {parent} is not a directory"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"cannot create {path}: {parent} is not writable{_read_only(parent)}"
    return None
