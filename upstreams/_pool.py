"""The set of upstream clients built from the settings, as one async resource.

``open_upstreams`` reads each upstream's ``password_file`` or ``password_env`` and ``ca_file``
at start (a missing file or variable is a configuration error naming the upstream, an empty
variable means anonymous pulls and a warning; each client rereads the file when it changes, so
a rotated password needs no restart), reads the environment's outbound proxy (``_proxies``; one
that cannot be used is a configuration error, ``NO_PROXY`` entries it cannot read a warning),
loads the network modules the first request would otherwise import, builds one pooled client
per upstream, and closes them all on exit.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

import httpx

from moorage.config import ConfigError, UnreadableFile, UpstreamSettings, read_text

from ._client import RegistryClient, UpstreamObserver
from ._network import load_network_modules
from ._proxies import ProxyEnvironment
from ._routing import Router
from ._trust import trust_for

__all__ = ["open_upstreams", "read_password"]

log = logging.getLogger("moorage.upstreams")


def read_password(index: int, settings: UpstreamSettings, *, warn: bool = True) -> str | None:
    """The password of ``upstreams[index]``, from its ``password_file`` or ``password_env``;
    blocks. ``warn``: log that an empty variable means anonymous pulls (the clients' opening
    does; the start-up check, which runs before it, only checks)."""
    if settings.password_env is not None:
        name = settings.password_env
        # Named only when it reads as a variable's name: a token put there by mistake is not echoed.
        shown = name if re.fullmatch(r"[A-Z][A-Z0-9_]{0,63}", name) else "it names"
        if name not in os.environ:
            raise ConfigError(None, [f"upstreams[{index}].password_env: the environment variable {shown} is not set"])
        password = os.environ[name].strip()
        if not password:  # e.g. a CI secret withheld from a fork's pull request
            if not warn:
                return None
            log.warning(
                "the password variable is empty: pulling anonymously",
                extra={"event": "upstream_password_empty", "upstream": settings.host, "variable": shown},
            )
            return None
        return password
    if settings.password_file is None:
        return None
    try:
        return read_text(settings.password_file).strip()
    except UnreadableFile as exc:
        raise ConfigError(
            None, [f"upstreams[{index}].password_file: cannot read {settings.password_file}: {exc}"]
        ) from None


@asynccontextmanager
async def open_upstreams(
    upstreams: Sequence[UpstreamSettings],
    observer: UpstreamObserver | None = None,
    transport: httpx.AsyncBaseTransport | None = None,
) -> AsyncIterator[Router[RegistryClient]]:
    await load_network_modules()
    proxies = None if transport is not None else ProxyEnvironment.read()
    if proxies is not None and proxies.proxies and proxies.ignored:  # their hosts go through the proxy
        log.warning(
            "NO_PROXY entries not understood, ignored",
            extra={"event": "no_proxy_ignored", "entries": list(proxies.ignored)},
        )
    clients = [
        RegistryClient(
            settings,
            password=read_password(i, settings),
            observer=observer,
            transport=transport,
            trust=trust_for(i, settings),
            proxies=proxies,
        )
        for i, settings in enumerate(upstreams)
    ]
    try:
        yield Router(clients)
    finally:
        for client in clients:
            await client.aclose()
