"""Running the server: the main listener (HTTPS when ``tls`` is set, its certificate reloaded on
SIGHUP or change), an optional metrics listener, and a staged stop.

On SIGTERM or SIGINT: /readyz fails while requests are still taken for ``shutdown_delay``;
then stop accepting, close idle connections, give requests in flight ``shutdown_timeout`` (a
second signal cuts the delay short, and then the requests), then close the cache (fills
still running are cancelled and their temporaries removed).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import resource
import signal
import socket
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from aiohttp import web

from moorage.config import Settings, split_address

from ._app import build_app, metrics_app
from ._state import IN_FLIGHT, LEAVING, STOPPING
from ._tls import ServerTls

__all__ = ["ListenFailed", "running", "serve"]

log = logging.getLogger("moorage")


def raise_open_files_limit() -> int:
    """Raise this process's limit of open files to the most it may have, and return it. The
    soft limit is often 1,024 (systemd's default, inherited by containers): a thousand idle
    connections, anyone's, then left no descriptor to answer with or to open a blob."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = max(soft, 1024 * 1024)
    if soft != resource.RLIM_INFINITY and soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def runner_options(settings: Settings) -> dict[str, Any]:
    """How the pull routes are served (the proxy tests' server takes the same). aiohttp's
    keep-alive timeout also runs while a request head is being received, so it drops idle
    clients and byte-by-byte (slowloris) ones alike. A handler is not cancelled when its
    client leaves: the cache notices where it matters (a send fails; a client waiting for a
    download to begin is looked at, see ``Cache.blob``)."""
    return {
        "access_log": None,
        "handler_cancellation": False,
        "shutdown_timeout": settings.shutdown_timeout,
        "keepalive_timeout": settings.client_idle_timeout,
    }


def _runner(app: web.Application, settings: Settings) -> web.AppRunner:
    """The runner of the pull routes."""
    return web.AppRunner(app, **runner_options(settings))


class ListenFailed(Exception):
    """A listener could not be opened; the message names its setting and address."""


async def _listen(
    runner: web.AppRunner, key: str, address: str, ssl_context: ssl.SSLContext | None = None
) -> web.TCPSite:
    """A started site on ``address`` (``settings.listen`` or ``metrics_listen``). No host means
    every address, IPv4 and IPv6 (as a Go server's ``:5000``: a pod of an IPv6-only cluster is
    probed and reached on its IPv6 address); where the machine has no IPv6, IPv4 alone."""
    host, port = split_address(address)
    site = web.TCPSite(runner, host or None, port, ssl_context=ssl_context)
    try:
        await site.start()
    except OSError as error:
        if host or error.errno not in (errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT):
            raise ListenFailed(f"cannot listen on {address} ({key}): {error.strerror or error}") from None
        await site.stop()
        log.warning(
            "no IPv6 here: listening on IPv4 addresses alone",
            extra={"event": "listen_ipv4_only", "listen": address, "error": error.strerror or str(error)},
        )
        return await _listen(runner, key, f"0.0.0.0:{port}", ssl_context)
    return site


def _close_stalled_connections(site: web.TCPSite, seconds: float) -> None:
    """Connections ``site`` accepts are closed by the kernel once what the cache sent stays
    unacknowledged, or unsent because the client stopped reading, for ``seconds``
    (TCP_USER_TIMEOUT, which Linux copies from the listening socket to each accepted one).
    A client that stops reading would otherwise hold its connection, and the file of a blob
    evicted meanwhile, with its disk space, for as long as it lives."""
    if not seconds or not hasattr(socket, "TCP_USER_TIMEOUT"):
        return
    server = site._server  # aiohttp keeps its asyncio.Server only there
    for listening in getattr(server, "sockets", ()):
        try:
            listening.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, max(1, round(seconds * 1000)))
        except OSError as error:  # a kernel without it: serve all the same, and say so
            log.warning(
                "client_send_timeout not applied",
                extra={"event": "client_send_timeout_unsupported", "error": error.strerror or str(error)},
            )
            return


def _stop_at_once(signum: int, _frame: object) -> None:
    """SIGTERM or SIGINT before serving takes them over: the process ends as by their default
    action, which the kernel does not take for a container's first process (PID 1). A start
    that hung there (an index another process held locked) had let the kubelet's SIGTERM
    pass, and the pod was killed only at the end of its grace period."""
    name = signal.Signals(signum).name
    log.warning("stopped by a signal before serving", extra={"event": "start_interrupted", "signal": name})
    logging.shutdown()  # the log writer's thread writes what waits
    os._exit(128 + signum)


async def serve(settings: Settings, version: str) -> None:
    for signum in (signal.SIGTERM, signal.SIGINT):  # until serving takes them over, once listening
        signal.signal(signum, _stop_at_once)
    app = build_app(settings)
    runners: list[web.AppRunner] = []
    main_runner = _runner(app, settings)
    runners.append(main_runner)
    log.info(
        "starting",
        extra={
            "event": "starting",
            "version": version,
            "listen": settings.listen,
            "store": str(settings.storage.path),
            "upstreams": [u.host for u in settings.upstreams],
            "open_files_limit": raise_open_files_limit(),
        },
    )
    tls = ServerTls(settings.tls) if settings.tls is not None else None
    watcher: asyncio.Task[None] | None = None
    loop = asyncio.get_running_loop()
    try:
        await main_runner.setup()
        site = await _listen(main_runner, "listen", settings.listen, tls.context if tls else None)
        _close_stalled_connections(site, settings.client_send_timeout)
        if settings.metrics_listen is not None:
            metrics_runner = web.AppRunner(metrics_app(app), access_log=None)
            runners.append(metrics_runner)
            await metrics_runner.setup()
            await _listen(metrics_runner, "metrics_listen", settings.metrics_listen)
        log.info(
            "listening",
            extra={"event": "listening", "listen": settings.listen, "metrics_listen": settings.metrics_listen},
        )
        # Taken over once listening: until then a signal ends the process at once (a start
        # that hangs or fails must stay stoppable, also as PID 1: see ``_stop_at_once``).
        stop = asyncio.Event()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        if tls is not None:
            reloads: set[asyncio.Task[None]] = set()

            def reload_soon() -> None:  # the files are read in a thread, not on the loop
                task = loop.create_task(asyncio.to_thread(tls.reload))
                reloads.add(task)
                task.add_done_callback(reloads.discard)

            loop.add_signal_handler(signal.SIGHUP, reload_soon)
            watcher = loop.create_task(tls.watch())
        else:  # SIGHUP's default ends the process (a log rotation's postrotate sends it)
            loop.add_signal_handler(signal.SIGHUP, _nothing_to_reload)
        await stop.wait()
        app[LEAVING].set()
        hurry = asyncio.Event()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, hurry.set)  # a second signal (Ctrl-C again): cut them now
        log.info(
            "stopping",
            extra={
                "event": "stopping",
                "shutdown_delay": settings.shutdown_delay,
                "shutdown_timeout": settings.shutdown_timeout,
            },
        )
        if settings.shutdown_delay > 0:  # /readyz fails; requests are still taken meanwhile
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(hurry.wait(), settings.shutdown_delay)
                hurry.clear()  # a signal ended the delay; another cuts the requests
        app[STOPPING].set()
        await _drain(main_runner, app, settings.shutdown_timeout, hurry)
    finally:
        if watcher is not None:
            watcher.cancel()
        for runner in reversed(runners):
            await runner.cleanup()
    log.info("stopped", extra={"event": "stopped"})


def _nothing_to_reload() -> None:
    log.info(
        "SIGHUP: nothing to reload (no tls); users, groups and policies are reloaded when their files change",
        extra={"event": "sighup"},
    )


async def _drain(runner: web.AppRunner, app: web.Application, grace: float, hurry: asyncio.Event) -> None:
    """Stop taking connections and requests, give those in flight ``grace`` seconds to finish
    (less if ``hurry`` is set), then cut the rest. (aiohttp's own shutdown waits its timeout for
    them, then asks them to stop by failing their request body, which a handler sending a blob
    never reads, and waits as long again: a slow client kept the process up for twice
    ``shutdown_timeout``.)"""
    for site in runner.sites:
        await site.stop()
    for _ in range(3):  # a request already read reaches the access middleware, and is tracked:
        await asyncio.sleep(0)  # one turn wakes its connection, the next runs its handler's task
    in_flight = app[IN_FLIGHT]
    if runner.server is not None:
        runner.server.pre_shutdown()  # a busy connection closes after its response
        busy = set(in_flight.values())
        for connection in runner.server.connections:
            if connection not in busy:  # an idle one now: closed, so its client opens another
                connection.force_close()
    deadline = asyncio.get_running_loop().time() + grace
    hurried = asyncio.ensure_future(hurry.wait())
    try:
        while in_flight and not hurry.is_set() and (left := deadline - asyncio.get_running_loop().time()) > 0:
            await asyncio.wait({*in_flight, hurried}, timeout=left, return_when=asyncio.FIRST_COMPLETED)
    finally:
        hurried.cancel()
    late = set(in_flight)
    for task in late:
        task.cancel()  # the access log records each as cut by the stop
    if late:
        await asyncio.wait(late, timeout=5)


@asynccontextmanager
async def running(settings: Settings, *, unix_socket: Path | None = None) -> AsyncIterator[str]:
    """Moorage on the settings' store, in this process, on a free loopback port, or on
    ``unix_socket``; its base URL.

    For commands that work "directly on a store" (``moorage warm --store``): they then speak
    to it exactly as they would to a daemon.
    """
    runner = _runner(build_app(settings), settings)
    await runner.setup()
    try:
        if unix_socket is not None:
            await web.UnixSite(runner, str(unix_socket)).start()
            yield "http://localhost"
            return
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        host, port = runner.addresses[0][:2]
        yield f"http://{host}:{port}"
    finally:
        await runner.cleanup()
