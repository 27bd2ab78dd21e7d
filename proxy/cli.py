"""The ``moorage`` command: run the cache, check settings, look inside, warm it, set clients up.

Every command has ``--help`` with examples. A user mistake (a bad config file, an unknown
image, a store that is not there) is one line on stderr and exit code 2, never a traceback;
``healthcheck`` exits 0 or 1 for container health checks.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import os
import shutil
import ssl
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, NoReturn
from urllib.parse import urlsplit

import click
from prometheus_client.parser import text_string_to_metric_families

from moorage.cache import (
    Expiry,
    StoreFailure,
    StoreSummary,
    collect_garbage,
    is_store,
    preview_lifecycle,
    read_catalog,
    read_summary,
    verify_store,
)
from moorage.config import (
    CONFIG_ENV,
    AuthSettings,
    ConfigError,
    LifecyclePolicyError,
    Settings,
    UnreadableFile,
    duration_text,
    load_lifecycle_policy,
    load_settings,
    parse_duration,
    parse_size,
    read_text,
    settings_source,
    size_text,
)
from moorage.upstreams import tls_failure
from moorage.upstreams.reference import ImageReference, InvalidReference, parse_image_reference

from ._auth import Htpasswd
from ._build import package_version
from ._client_config import CLIENTS, CONFIG_DIRS, Client, ClientOptions, client_files, client_warnings, merged_with
from ._logging import configure_logging
from ._preflight import policy_warnings, preflight, routing_warnings
from ._serve import ListenFailed, running, serve
from ._tokens import TokenKeys, key_path

__all__ = ["main"]

EXIT_USAGE = 2

if TYPE_CHECKING:
    from rich.console import Console

    from ._warm import WarmedImage


def console(err: bool = False) -> Console:
    """A rich console, imported only by the commands that show progress (rich is a few MiB
    the server does not need). Rows stay whole when piped."""
    from rich.console import Console

    stream = sys.stderr if err else sys.stdout
    return Console(file=stream, soft_wrap=True, width=None if stream.isatty() else 400)


def fail(message: str, code: int = EXIT_USAGE) -> NoReturn:
    click.echo(f"moorage: {message}", err=True)
    sys.exit(code)


def settings_file(config: Path | None) -> Path | None:
    """``--config``, else ``$MOORAGE_CONFIG``, else none (the defaults)."""
    if config is None and os.environ.get(CONFIG_ENV):
        return Path(os.environ[CONFIG_ENV])
    return config


def settings_from(config: Path | None, code: int = EXIT_USAGE, *, policies: bool = False) -> Settings:
    """The settings from ``--config``, else ``$MOORAGE_CONFIG``, else defaults; overlaid with
    ``MOORAGE_*``. A bad file ends the command with exit code ``code`` (2). Lifecycle policy
    files are checked only with ``policies`` (serving): other commands read none, or each
    where they use it, so one that a live edit broke stops none of them."""
    try:
        return load_settings(settings_file(config), os.environ, skip_policies=not policies)
    except ConfigError as error:
        fail(str(error), code)


def check_files(settings: Settings, source: str) -> list[str]:
    """End the command with exit code 2 if serving would refuse a file the settings name;
    else what is doubtful (policy rules naming unknown users, groups or registries)."""
    problems, doubts = preflight(settings)
    if problems:
        fail(str(ConfigError(source, problems)))
    return doubts


config_option = click.option(
    "--config",
    type=click.Path(path_type=Path, dir_okay=False),
    help=f"YAML settings file (default: ${CONFIG_ENV}, else the built-in defaults).",
)
store_option = click.option(
    "--store",
    type=click.Path(path_type=Path, file_okay=False),
    help="Store directory (default: storage.path from the settings).",
)


def url_problem(url: str, *, path_ok: bool = True, user_ok: bool = False) -> str | None:
    """Why ``url`` is not a cache's base URL (``http://127.0.0.1:5000``), if it is not;
    ``path_ok``: a path after the address is allowed (an endpoint, a proxy's prefix);
    ``user_ok``: a user and password before the host are (``warm`` signs in with them). The
    message never repeats a password."""
    if not user_ok and "@" in url:
        return "--url: leave the user and password out: /healthz and /metrics ask for none"
    # A URL with a user in it is never repeated, nor the parser's words about it: a password
    # with an unencoded '/', '?', '#' or '@' splits the URL anywhere.
    shown = repr(url[:100]) if "@" not in url else "the URL given (not repeated: it holds a password)"
    expected = f"expected the cache's base URL, e.g. http://127.0.0.1:5000, not {shown}"
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 -- raises on a port out of range or not a number
    except ValueError as error:
        return f"--url: {error if '@' not in url else 'no host and port can be read from it'}: {expected}"
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        return f"--url: {expected}"
    if not path_ok and parts.path not in ("", "/"):
        return f"--url: the cache's base URL has no path: {expected}"
    return None


def warm_settings(settings: Settings, store: Path | None) -> Settings:
    """The settings of the cache ``warm`` runs in its own process. Whoever may open the store
    needs no sign-in: client auth and access rules are off, and the cache is reached only
    through a socket in a directory of its own (mode 0700), never on a port other users could
    reach meanwhile. It runs no scheduled gc or lifecycle pass (a due one ran a minute after
    the start, and expired images the warm had just reported warmed); ``store`` replaces the
    store's path, and only that (the size cap and the rest still apply)."""
    storage = settings.storage.model_copy(update={"gc_interval": 0.0, "lifecycle_interval": 0.0})
    if store is not None:
        storage = storage.model_copy(update={"path": store})
    return settings.model_copy(update={"auth": AuthSettings(), "storage": storage})


def _require_store(path: Path, *, store_option: bool = True) -> None:
    if not is_store(path):
        where = f"{path} ({path.resolve()})" if not path.is_absolute() else str(path)
        store = "name the one serve uses with --store DIR, or" if store_option else "name"
        fail(
            f"no Moorage store at {where}; {store} its settings with --config FILE or ${CONFIG_ENV}"
            " (a store is made by the first `moorage serve` on it)"
        )


def _store_path(config: Path | None, store: Path | None) -> Path:
    return store if store is not None else settings_from(config).storage.path


class _Commands(click.Group):
    """Every command. A store any of them cannot use (an index another user owns or a
    read-only mount, a damaged one) ends it with one line naming the store, not a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except StoreFailure as error:
            fail(f"storage.path: {error}")


@click.group(
    cls=_Commands,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
    epilog="Run 'moorage COMMAND --help' for a command's options and examples.",
)
@click.version_option(package_version(), "--version", prog_name="moorage", message="%(prog)s %(version)s")
def main() -> None:
    """A pull-through cache for container registries."""


@main.command("serve", epilog="Examples:\n\n  moorage serve\n\n  moorage serve --config /etc/moorage/config.yaml")
@config_option
def serve_command(config: Path | None) -> None:
    """Run the cache.

    With no settings file it mirrors Docker Hub (the default upstream) and ghcr.io, quay.io,
    registry.k8s.io, gcr.io, public.ecr.aws and mcr.microsoft.com on port 5000, with the
    store in ./moorage-data.
    """
    settings = settings_from(config, policies=True)
    source = settings_source(settings_file(config), os.environ)
    doubts = check_files(settings, source)
    configure_logging(settings.log_level, settings.log_format)
    for doubt in doubts:
        logging.getLogger("moorage.proxy").warning(doubt, extra={"event": "policy_rule_unknown_name"})
    for unrouted in routing_warnings(settings):
        logging.getLogger("moorage.proxy").warning(unrouted, extra={"event": "no_default_upstream"})
    try:
        asyncio.run(serve(settings, package_version()))
    except ConfigError as error:
        _start_failed(str(error.named(source)))
    except ListenFailed as error:
        _start_failed(str(error))
    except OSError as error:
        _start_failed(f"cannot listen on {settings.listen}: {error.strerror or error}")


def _start_failed(message: str) -> NoReturn:
    """End ``serve`` after its log began: a line of the log, as every other (JSON where the
    log is), not text among JSON lines; exit code 2, as for any user mistake."""
    logging.getLogger("moorage.proxy").critical(message, extra={"event": "start_failed"})
    sys.exit(EXIT_USAGE)


@main.command(
    "check-config",
    epilog="Examples:\n\n  moorage check-config /etc/moorage/config.yaml\n\n"
    "  moorage check-config --skip-files config.yaml   # away from the machine that serves it",
)
@click.argument("file", type=click.Path(path_type=Path, dir_okay=False))
@click.option(
    "--skip-files",
    is_flag=True,
    help="Check the settings alone: do not read the certificates, htpasswd, groups, key and password "
    "files they name, nor look at the store directory; lifecycle policy files are read where they are there.",
)
def check_config(file: Path, skip_files: bool) -> None:
    """Validate a settings file (and MOORAGE_* variables) as serving would, without serving."""
    try:
        settings = load_settings(file, os.environ, skip_files=skip_files)
    except ConfigError as error:
        fail(str(error))
    # Away from the server, what needs no file is still judged (a registry no upstream here).
    doubts = policy_warnings(settings, None) if skip_files else check_files(settings, settings_source(file, os.environ))
    for doubt in doubts:
        click.echo(f"moorage: warning: {doubt}", err=True)
    for unrouted in routing_warnings(settings):
        click.echo(f"moorage: warning: {unrouted}", err=True)
    read = "files not read" if skip_files else "files read"
    count = len(settings.upstreams)
    click.echo(f"{file}: ok ({count} upstream{'s' if count != 1 else ''}, store in {settings.storage.path}; {read})")


@main.command(
    epilog="Examples:\n\n  moorage healthcheck\n\n  moorage healthcheck --url http://127.0.0.1:5000\n\n"
    "  HEALTHCHECK CMD moorage healthcheck"
)
@click.option("--url", help="Base URL of the cache (default: from the settings' listen address).")
@click.option("--timeout", default="3", show_default=True, help="Seconds to wait for an answer.")
@config_option
def healthcheck(url: str | None, timeout: str, config: Path | None) -> None:
    """Exit 0 when the cache answers /healthz, 1 otherwise (for container health checks)."""
    unhealthy = 1  # for every mistake too: Docker reserves exit code 2 in health checks
    seconds = _seconds_or_none(timeout)
    if seconds is None:
        fail(f"--timeout must be a number of seconds above 0, not {timeout[:20]!r}", unhealthy)
    context = None
    if url is None:
        settings = settings_from(config, unhealthy)
        host, port = settings.listen_host, settings.listen_port
        scheme = "https" if settings.tls is not None else "http"
        host = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)  # "::" is IPv6 alone
        url = f"{scheme}://{f'[{host}]' if ':' in host else host}:{port}"  # an IPv6 address in brackets
        if settings.tls is not None:  # its own listener: the name in the certificate may differ
            context = ssl.create_default_context()
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
    problem = url_problem(url)
    if problem is not None:
        fail(problem, unhealthy)
    base = url.rstrip("/").removesuffix("/healthz")
    try:
        with _open_url(f"{base}/healthz", seconds, context) as response:
            healthy = response.status == 200
    except (urllib.error.URLError, OSError) as error:
        fail(f"{url} is not healthy: {error}{_tls_hint(error)}", unhealthy)
    sys.exit(0 if healthy else unhealthy)


def _tls_hint(error: BaseException) -> str:
    failure = tls_failure(error)
    if failure == "plain_http":
        return " (an https:// URL for a listener that speaks plain HTTP? Use http://)"
    if failure == "untrusted":
        return " (a certificate a private CA signed? Name the CA's file in SSL_CERT_FILE)"
    return ""


def _open_url(url: str, timeout: float, context: ssl.SSLContext | None = None) -> Any:
    """``urllib.request.urlopen``, but never through a proxy for a loopback address: a
    container's HTTPS_PROXY (set for the upstreams) would otherwise carry the health check to
    the proxy, and the cache would read as unhealthy."""
    host = urlsplit(url).hostname or ""
    handlers: list[urllib.request.BaseHandler] = [urllib.request.HTTPSHandler(context=context)]
    if host == "localhost" or _is_loopback(host):
        handlers.append(urllib.request.ProxyHandler({}))
    return urllib.request.build_opener(*handlers).open(url, timeout=timeout)


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _size(value: int | None) -> str:
    return "-" if value is None else size_text(value)


def _columns(header: Sequence[str], rows: Sequence[Sequence[str]]) -> Iterator[str]:
    """A table as lines of left-aligned columns two spaces apart, the header first. Plain
    text: rich's tables took half a millisecond a row, 50 s for ``ls`` of 100,000 tags."""
    widths = [max(len(cell) for cell in column) for column in zip(header, *rows, strict=True)]
    for row in (header, *rows):
        yield "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()


def _when(epoch: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(epoch)) if epoch else "-"


@main.command(
    "ls",
    epilog="Examples:\n\n  moorage ls\n\n  moorage ls 'docker.io/library/*'\n\n  moorage ls 'ghcr.io/*' --json",
)
@click.argument("pattern", required=False)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per tag instead of a table.")
@config_option
@store_option
def ls(pattern: str | None, as_json: bool, config: Path | None, store: Path | None) -> None:
    """List cached tags: digest, size, last pulled, upstream.

    PATTERN is a glob over UPSTREAM/REPOSITORY:TAG, REPOSITORY:TAG, the repository alone, or an
    official image's short name (alpine:3.19).
    """
    path = _store_path(config, store)
    _require_store(path)
    try:
        tags = read_catalog(path, pattern)
    except FileNotFoundError as error:
        fail(str(error))
    if as_json:
        for tag in tags:
            click.echo(json.dumps(asdict(tag)))
        return
    rows = [
        (tag.upstream, tag.repository, tag.tag, tag.digest[:19], _size(tag.size), _when(tag.pulled_at)) for tag in tags
    ]
    for line in _columns(("UPSTREAM", "REPOSITORY", "TAG", "DIGEST", "SIZE", "LAST PULLED"), rows):
        click.echo(line)
    if not tags:
        click.echo(f"no cached tags{' match ' + pattern if pattern else ''} in {path}", err=True)


def _summary_from_metrics(url: str) -> dict[str, dict[str, float]]:
    """Per upstream counters from a running daemon's /metrics."""
    with _open_url(f"{url.rstrip('/')}/metrics", 10) as response:
        text = response.read().decode()
    usage: dict[str, dict[str, float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.value == 0 and sample.name.endswith("_total"):
                continue  # every upstream's counters start at 0: those never used get no row
            if sample.name == "moorage_cache_results_total":
                counters = usage.setdefault(sample.labels["upstream"], {})
                counters[sample.labels["result"]] = counters.get(sample.labels["result"], 0) + sample.value
            elif sample.name == "moorage_upstream_fetched_bytes_total":
                counters = usage.setdefault(sample.labels["upstream"], {})
                counters["upstream_bytes"] = counters.get("upstream_bytes", 0) + sample.value
            elif sample.name == "moorage_served_bytes_total":
                counters = usage.setdefault(sample.labels["upstream"], {})
                if sample.labels["result"] == "hit":
                    counters["hit_bytes"] = counters.get("hit_bytes", 0) + sample.value
                counters["served_bytes"] = counters.get("served_bytes", 0) + sample.value
            elif sample.name in ("moorage_store_bytes", "moorage_store_entries"):
                usage.setdefault("*", {})[sample.name] = sample.value
    return usage


@dataclass
class StatsReport:
    source: str
    store_bytes: int
    store_entries: int
    #: Counters per upstream: cache results (hit, miss, ...) and byte totals.
    upstreams: dict[str, dict[str, float]]


def _hit_ratio(counters: dict[str, float]) -> float:
    """Answers that cost no upstream GET, out of all answers."""
    hits = counters.get("hit", 0) + counters.get("revalidated", 0) + counters.get("stale", 0)
    fetched = ("miss", "coalesced", "prefetched", "refreshed")
    total = hits + sum(counters.get(result, 0) for result in fetched)
    return hits / total if total else 0.0


def _ratio(counters: dict[str, float]) -> str:
    return f"{100 * _hit_ratio(counters):.1f}%" if any(counters.get(r) for _, r in _ANSWER_COLUMNS) else "-"


@main.command(
    epilog="Examples:\n\n  moorage stats\n\n  moorage stats --url http://127.0.0.1:5000\n\n  moorage stats --json"
)
@click.option("--url", help="Ask a running daemon (its /metrics, since it started) instead of the store.")
@click.option("--json", "as_json", is_flag=True, help="JSON instead of a table.")
@config_option
@store_option
def stats(url: str | None, as_json: bool, config: Path | None, store: Path | None) -> None:
    """Hit ratio, bytes saved and store size, per upstream.

    From the store (counted since the store began, flushed every 10 s) or, with --url, from a
    running daemon (since it started).
    """
    if url is not None:
        if (problem := url_problem(url)) is not None:
            fail(problem)
        url = url.rstrip("/").removesuffix("/metrics")  # the endpoint's own URL works too
        try:
            upstreams = _summary_from_metrics(url)
        except (ValueError, KeyError, UnicodeDecodeError):  # 200, but no Moorage metrics in it
            fail(f"{url}/metrics is not a Moorage cache's metrics: is --url the cache's address?")
        except (urllib.error.URLError, OSError) as error:
            hint = ""
            if isinstance(error, urllib.error.HTTPError) and error.code == 404:
                metrics_listen = settings_from(config).metrics_listen
                hint = (
                    f" (the settings serve /metrics on {metrics_listen}: pass --url http://{metrics_listen})"
                    if metrics_listen is not None
                    else " (is it the cache's address? A cache with metrics_listen set serves /metrics there only)"
                )
            fail(f"cannot read {url}/metrics: {error}{hint or _tls_hint(error)}")
        totals = upstreams.pop("*", {})
        report = StatsReport(
            url, int(totals.get("moorage_store_bytes", 0)), int(totals.get("moorage_store_entries", 0)), upstreams
        )
    else:
        path = _store_path(config, store)
        _require_store(path)
        try:
            summary: StoreSummary = read_summary(path)
        except FileNotFoundError as error:
            fail(str(error))
        upstreams = {u: {k: float(v) for k, v in c.items()} for u, c in summary.usage.items()}
        for upstream, count in summary.tags.items():
            upstreams.setdefault(upstream, {})["tags"] = count
        report = StatsReport(summary.path, summary.bytes, summary.entries, upstreams)
    if as_json:
        document = asdict(report)
        for upstream, counters in report.upstreams.items():
            # Counts are whole numbers (Prometheus reads every sample as a float); the ratio is not.
            shown: dict[str, float] = {k: int(v) if float(v).is_integer() else v for k, v in counters.items()}
            document["upstreams"][upstream] = {**shown, "hit_ratio": _hit_ratio(counters)}
        click.echo(json.dumps(document))
        return
    click.echo(f"store: {_size(report.store_bytes)} in {report.store_entries} blobs and manifests ({report.source})")
    for line in _stats_table(report):
        click.echo(line)


#: The table's answer columns: the hit ratio's numerator first, then the answers that waited
#: on an upstream GET, each with the ``result`` it counts.
_ANSWER_COLUMNS: Final = (
    ("HITS", "hit"),
    ("REVALIDATED", "revalidated"),
    ("STALE", "stale"),
    ("MISSES", "miss"),
    ("COALESCED", "coalesced"),
    ("PREFETCHED", "prefetched"),
    ("REFRESHED", "refreshed"),
)


def _stats_table(report: StatsReport) -> list[str]:
    header = ("UPSTREAM", "HIT RATIO", *(title for title, _ in _ANSWER_COLUMNS), "SERVED FROM STORE", "FETCHED")
    rows = [
        (
            upstream,
            _ratio(counters),
            *(str(int(counters.get(result, 0))) for _, result in _ANSWER_COLUMNS),
            _size(int(counters["hit_bytes"])) if "hit_bytes" in counters else "-",
            _size(int(counters.get("upstream_bytes", 0))),
        )
        for upstream, counters in sorted(report.upstreams.items())
    ]
    return list(_columns(header, rows))


def _read_images(images: Sequence[str], file: Path | None) -> list[tuple[str | None, str]]:
    """(where it was written, the image): the arguments, then ``file``'s lines, each named
    ``FILE:LINE``; ``#`` starts a comment (no image reference holds one)."""
    names: list[tuple[str | None, str]] = [(None, image) for image in images]
    if file is not None:
        try:
            lines = read_text(file).splitlines()
        except UnreadableFile as error:
            fail(f"cannot read {file}: {error}")
        for number, line in enumerate(lines, 1):
            if name := line.partition("#")[0].strip():
                names.append((f"{file}:{number}", name))
    if not names:
        fail("name at least one image (or -f FILE)")
    return names


@main.command(
    "warm",
    epilog="Examples:\n\n  moorage warm alpine:3.19 ghcr.io/owner/app:1\n\n"
    "  moorage warm -f images.txt --all-platforms --url http://moorage.example:5000\n\n"
    "  moorage warm --platform linux/arm64 --store /var/lib/moorage nginx:1.27\n\n"
    "  moorage warm --referrers ghcr.io/owner/app:1",
)
@click.argument("images", nargs=-1)
@click.option("-f", "--file", type=click.Path(path_type=Path, dir_okay=False), help="Images, one per line.")
@click.option("--platform", "platforms", multiple=True, help="os/arch[/variant] of an index to warm (repeatable).")
@click.option("--all-platforms", is_flag=True, help="Every platform of an index.")
@click.option(
    "--referrers",
    "with_referrers",
    is_flag=True,
    help="Also the images' signatures, SBOMs and attestations (referrers, or the tag schema's and cosign's tags).",
)
@click.option("--url", help="Warm a running daemon at this base URL (default: work on the store directly).")
@config_option
@store_option
def warm_command(
    images: tuple[str, ...],
    file: Path | None,
    platforms: tuple[str, ...],
    all_platforms: bool,
    with_referrers: bool,
    url: str | None,
    config: Path | None,
    store: Path | None,
) -> None:
    """Pre-pull images into the cache.

    Each IMAGE is written as for docker pull (alpine:3.19, ghcr.io/owner/app@sha256:...); a name
    without a registry goes to the default upstream of the settings (Docker Hub unless
    configured otherwise). For a multi-platform image, linux/amd64 is warmed unless --platform
    or --all-platforms says otherwise.
    """
    if platforms and all_platforms:
        fail("--platform and --all-platforms exclude each other")
    if url is not None and (problem := url_problem(url, path_ok=False, user_ok=True)) is not None:
        fail(problem)
    default = settings_from(config).default_host or "docker.io"
    references: list[ImageReference] = []
    #: Images that are no image reference: named with the others that failed, at the end.
    unreadable: list[str] = []
    for where, name in _read_images(images, file):
        try:
            references.append(parse_image_reference(name, default))
        except InvalidReference as error:
            unreadable.append(f"{where}: {error}" if where else str(error))
    wanted = None if all_platforms else list(platforms or ["linux/amd64"])
    from ._warm import WarmFailed, WarmIncomplete, progress_bars, warm

    async def run() -> list[WarmedImage]:
        with progress_bars(console(err=True)) as progress:
            if url is not None:
                return await warm(url, references, wanted, progress, referrers=with_referrers)
            with tempfile.TemporaryDirectory(prefix="moorage-warm-") as private:
                unix_socket = Path(private) / "cache.sock"
                async with running(warm_settings(settings_from(config), store), unix_socket=unix_socket) as local:
                    return await warm(
                        local, references, wanted, progress, referrers=with_referrers, unix_socket=unix_socket
                    )

    failures: list[WarmFailed] = [WarmFailed(text) for text in unreadable]
    try:
        warmed = asyncio.run(run()) if references else []
    except ConfigError as error:  # the store cannot be used (not a directory, not writable)
        fail(str(error.named(settings_source(settings_file(config), os.environ))))
    except WarmIncomplete as incomplete:
        warmed, failures = incomplete.warmed, failures + incomplete.failures
    except WarmFailed as error:
        fail(str(error))
    except OSError as error:
        fail(f"cannot reach the cache: {error}{_tls_hint(error)}")
    for image in warmed:
        results = ", ".join(f"{count} {result}" for result, count in sorted(image.results.items()))
        platforms_text = f" [{', '.join(image.platforms)}]" if image.platforms else ""
        attached = f", {image.referrers} referrers" if with_referrers else ""
        click.echo(f"{image.image}{platforms_text}: {image.blobs} blobs{attached}, {_size(image.bytes)} ({results})")
    if failures:
        for failure in failures:
            click.echo(f"moorage: {failure}", err=True)
        fail(f"{len(failures)} of {len(references) + len(unreadable)} images not warmed")


@main.command(epilog="Examples:\n\n  moorage verify\n\n  moorage verify --repair --rate 50MiB --store /var/lib/moorage")
@click.option("--repair", is_flag=True, help="Move corrupt blobs to quarantine/ and forget them (refetched on pull).")
@click.option("--rate", default="100MiB", show_default=True, help="Read at most this many bytes per second.")
@config_option
@store_option
def verify(repair: bool, rate: str, config: Path | None, store: Path | None) -> None:
    """Rehash every stored blob; report (and with --repair quarantine) those that do not match.

    Exit code 0 when every blob matched (or every corrupt one was quarantined), 1 otherwise.
    Safe beside a running daemon: a quarantined blob reads as missing and is fetched again.
    """
    path = _store_path(config, store)
    try:
        rate_bytes = parse_size(rate)
    except ValueError as error:
        fail(f"--rate: {error}")
    _require_store(path)
    report = verify_store(path, repair=repair, rate_bytes=rate_bytes or None)
    for digest in report.corrupt:
        said = " (quarantined)" if digest in report.quarantined else ""
        if digest in report.stuck:
            said = f" (not quarantined: {report.stuck[digest]})"
        click.echo(f"corrupt: {digest}{said}")
    click.echo(
        f"checked {report.checked} blobs, {_size(report.checked_bytes)}: {len(report.corrupt)} corrupt"
        + (f", {len(report.quarantined)} quarantined" if repair else "")
    )
    sys.exit(0 if len(report.corrupt) == len(report.quarantined) else 1)


@main.command(epilog="Examples:\n\n  moorage gc --dry-run\n\n  moorage gc --grace 6h --store /var/lib/moorage")
@click.option("--grace", help="Keep unreferenced blobs younger than this (default: storage.gc_grace, 1h).")
@click.option("--dry-run", is_flag=True, help="Report what would go; remove nothing.")
@config_option
@store_option
def gc(grace: str | None, dry_run: bool, config: Path | None, store: Path | None) -> None:
    """Remove blobs no stored manifest refers to (older than the grace period).

    Every manifest the cache holds, tagged or pulled by digest, is kept, with everything it
    refers to. Safe beside a running daemon: anything removed by mistake is fetched again.
    """
    path = _store_path(config, store)
    try:
        grace_seconds = parse_duration(grace) if grace is not None else settings_from(config).storage.gc_grace
    except ValueError as error:
        fail(f"--grace: {error}")
    grace = duration_text(grace_seconds)  # as the settings write it, however it was given
    _require_store(path)
    report = collect_garbage(path, grace_seconds=grace_seconds, dry_run=dry_run)
    for digest in report.swept:
        click.echo(f"{'would remove' if dry_run else 'removed'}: {digest}")
    click.echo(
        f"{report.roots} manifests, {report.reachable} digests they reach (manifests included); "
        f"{'would remove' if dry_run else 'removed'} {len(report.swept)} ({_size(report.swept_bytes)}); "
        f"{report.kept_young} unreferenced but younger than {grace}"
    )


#: As auth.token_lifetime allows.
MAX_LOGIN_TOKEN_LIFETIME: Final = 31 * 86400


@main.command(
    "login-password",
    epilog="Examples:\n\n  moorage login-password --user ci | docker login --username ci --password-stdin "
    'cache.example:5000\n\n  podman login --username ci --password "$(moorage login-password --user ci)" '
    "cache.example:5000",
)
@click.option("--user", required=True, help="A user of auth.htpasswd_file.")
@click.option("--lifetime", help="How long the token works (default: auth.token_lifetime, 12h).")
@config_option
def login_password(user: str, lifetime: str | None, config: Path | None) -> None:
    """Print a short-lived password for USER, for docker/podman login --password-stdin.

    Like ECR's get-login-password: the token works as USER's password until it expires, and
    needs no stored secret on the client. Whoever can read the token signing key can mint
    these, so run it where the cache runs.
    """
    settings = settings_from(config)
    auth = settings.auth
    if auth.htpasswd_file is None:
        fail("auth.htpasswd_file is not set: there are no users to sign in as")
    try:
        seconds = parse_duration(lifetime) if lifetime is not None else auth.token_lifetime
    except ValueError as error:
        fail(f"--lifetime: {error}")
    try:
        users = Htpasswd(auth.htpasswd_file, auth.groups_file)
    except ConfigError as error:
        fail(str(error.named(settings_source(settings_file(config), os.environ))))
    version = users.password_version(user)
    if version is None:
        fail(f"--user: {user!r} is not in {auth.htpasswd_file}")
    if not 60 <= seconds <= MAX_LOGIN_TOKEN_LIFETIME:
        fail("--lifetime: between 1m and 31d")
    key_file = auth.token_signing_key_file
    if key_file is None:
        # The key is the store's: one made here, beside no store the daemon serves, would sign
        # tokens the daemon refuses; nor is it made here, as this user, for the daemon to find.
        _require_store(settings.storage.path, store_option=False)
        key_file = key_path(settings)
        if not key_file.exists():
            fail(f"no token signing key in the store yet ({key_file}): serve, with users set, makes it at its start")
    try:
        keys = TokenKeys.load(key_file, create=False)
    except (ValueError, OSError) as error:
        key = "auth.token_signing_key_file" if auth.token_signing_key_file is not None else "storage.path"
        fail(f"{key}: {error}")
    click.echo(keys.issue(user, frozenset(), seconds, kind="login", password_version=version))


@main.group()
def lifecycle() -> None:
    """ECR lifecycle policies over the cached images (see the README)."""


@lifecycle.command(
    epilog="Examples:\n\n  moorage lifecycle preview\n\n"
    "  moorage lifecycle preview --upstream docker.io --repository 'library/*' --config /etc/moorage/config.yaml"
)
@click.option("--upstream", help="Only this upstream (host as configured, e.g. docker.io).")
@click.option("--repository", help="Only repositories matching this glob (e.g. library/*).")
@click.option("--format", "output", type=click.Choice(["table", "json"]), default="table", show_default=True)
@config_option
@store_option
def preview(upstream: str | None, repository: str | None, output: str, config: Path | None, store: Path | None) -> None:
    """List the images the next lifecycle pass would expire, and the rule that expires each.

    Changes nothing; safe beside a running daemon. Policies are read from the config's
    upstreams (lifecycle_policy_file, lifecycle_policies).
    """
    settings = settings_from(config)
    path = _store_path(config, store)
    if upstream is not None and upstream not in {u.host for u in settings.upstreams}:
        fail(f"--upstream: {upstream!r} is not a configured upstream")
    _require_store(path)
    if not any(u.lifecycle for u in settings.upstreams):
        click.echo("moorage: no upstream has a lifecycle policy (lifecycle_policy_file, lifecycle_policies)", err=True)
    unreadable: set[str] = set()
    for host in settings.upstreams:  # each read now: one covering nothing stored yet is said too
        for binding in host.lifecycle if upstream in (None, host.host) else ():
            try:
                load_lifecycle_policy(binding.policy_file)
            except LifecyclePolicyError as problem:
                unreadable.add(str(problem))
    expiries = preview_lifecycle(
        path, settings.upstreams, upstream=upstream, repository=repository, unreadable=unreadable
    )
    for error in sorted(unreadable):  # as the daemon does: their repositories are left as they are
        click.echo(f"moorage: error: {error}: the repositories it binds are left out", err=True)
    _print_expiries(expiries, output)
    if unreadable:
        sys.exit(1)


def _print_expiries(expiries: list[Expiry], output: str) -> None:
    if output == "json":
        for expiry in expiries:
            image = expiry.image
            record = {
                "upstream": image.upstream,
                "repository": image.repository,
                "digest": str(image.digest),
                "tags": sorted(image.tags),
                "first_cached": image.pushed_at,
                "last_pulled": image.pulled_at,
                "rule": expiry.rule.rulePriority,
                "reason": expiry.reason,
            }
            click.echo(json.dumps(record))
        return
    rows = [
        (
            f"{expiry.image.upstream}/{expiry.image.repository}",
            ",".join(sorted(expiry.image.tags)) or "<untagged>",
            str(expiry.image.digest)[:19],
            _when(expiry.image.pushed_at),
            _when(expiry.image.pulled_at),
            expiry.reason,
        )
        for expiry in expiries
    ]
    for line in _columns(("IMAGE", "TAGS", "DIGEST", "FIRST CACHED", "LAST PULLED", "EXPIRED BY"), rows):
        click.echo(line)
    click.echo(f"{len(expiries)} image{'s' if len(expiries) != 1 else ''} would expire")


def _read_ca(path: Path) -> str:
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as error:
        fail(f"--ca: cannot read {path}: {getattr(error, 'strerror', None) or error}")
    if "-----BEGIN CERTIFICATE-----" not in text:
        fail(f"--ca: {path} holds no PEM certificate (-----BEGIN CERTIFICATE-----)")
    return text if text.endswith("\n") else text + "\n"


@main.command(
    "client-config",
    epilog="Examples:\n\n  moorage client-config docker --url http://moorage.example:5000\n\n"
    "  moorage client-config containerd --url http://moorage.example:5000 "
    "--output-dir /etc/containerd/certs.d\n\n"
    "  moorage client-config podman --url http://moorage.example:5000 --registries docker.io,ghcr.io",
)
@click.argument("client", type=click.Choice(list(CLIENTS)))
@click.option("--url", required=True, help="The cache's base URL as clients reach it.")
@click.option("--registries", help="Comma-separated registries to mirror (default: every configured upstream).")
@click.option(
    "--output-dir",
    type=click.Path(path_type=Path, file_okay=False),
    help="Write the files under this directory (for containerd: the certs.d directory itself).",
)
@click.option(
    "--ca",
    "ca_file",
    type=click.Path(path_type=Path, dir_okay=False),
    help="The CA (PEM) that signed the cache's https certificate, placed where the client trusts it.",
)
@click.option(
    "--no-fallback",
    is_flag=True,
    help="containerd and kind: make the cache the registries' server, so that a refused or failed pull "
    "never goes to the upstream itself (an access policy then holds; while the cache is down, nothing pulls).",
)
@config_option
def client_config(
    client: Client,
    url: str,
    registries: str | None,
    output_dir: Path | None,
    ca_file: Path | None,
    no_fallback: bool,
    config: Path | None,
) -> None:
    """Print (or write) a working client configuration for pulling through this cache."""
    ca = _read_ca(ca_file) if ca_file is not None else None
    settings = settings_from(config)
    upstreams, default = settings.upstreams, settings.default_host
    if registries:
        wanted = [r.strip().lower() for r in registries.split(",") if r.strip()]
        by_name = {name: u for u in upstreams for name in (u.host, *u.aliases)}
        unknown = [name for name in wanted if name not in by_name]
        if unknown:
            configured = ", ".join(u.host for u in upstreams)
            fail(f"--registries: not a configured upstream: {', '.join(unknown)} (configured: {configured})")
        upstreams = tuple(dict.fromkeys(by_name[name] for name in wanted))
    try:
        options = ClientOptions(ca=ca, catch_all=not registries, fallback=not no_fallback)
        files = client_files(client, url, upstreams, default, options)
    except ValueError as error:
        fail(str(error))
    refuses = settings.auth.refuses_some_pulls and not no_fallback
    anonymous = settings.auth.anonymous_may_pull
    for warning in client_warnings(client, url, upstreams, default, refuses, anonymous):
        click.echo(f"moorage: warning: {warning}", err=True)
    written: list[str] = []  # what was done, said once every file is written
    for path, content in files.items():
        if output_dir is None and len(files) == 1:  # the file alone, as it can be saved (JSON has no comments)
            click.echo(f"# file: {path}", err=True)
            click.echo(content)
            continue
        if output_dir is None:
            click.echo(f"# file: {path}\n{content}")
            continue
        target = output_dir / path.removeprefix(CONFIG_DIRS[client])  # kind's paths are relative already
        try:
            written += _write_client_file(target, path, content)
        except (OSError, _ClientFileRefused) as error:
            for line in written:  # what did change before the failure
                click.echo(line, err=True)
            if isinstance(error, OSError):  # a file where a directory should be, a read-only or immutable file
                fail(f"cannot write {target}: {error.strerror or error}; the file there is as it was")
            fail(str(error))
    for line in written:  # only now: a closed pipe on the output cannot stop the writing
        click.echo(line)


def _seconds_or_none(text: str) -> float | None:
    """``text`` as a number of seconds above 0 and at most a day, else None."""
    try:
        seconds = float(text)
    except ValueError:
        return None
    return seconds if 0 < seconds <= 86400 else None


class _ClientFileRefused(Exception):
    """A file already there that cannot be read, or that the cache's settings cannot be merged
    into: left alone."""


def _write_client_file(target: Path, path: str, content: str) -> list[str]:
    """Write one client file without losing what the host had there: the cache's settings are
    merged into a ``daemon.json`` or ``registries.yaml`` that holds others, the previous file
    is kept beside it as ``<name>.bak`` (``.bak.1``, … when that exists), and the new one is
    put in place whole, with the old one's mode and owner (through a symlink, at its target).
    What was done, to be printed once every file is written."""
    real = target.resolve() if target.is_symlink() else target
    try:
        existing = read_text(real) if real.exists() else None
    except UnreadableFile as error:
        raise _ClientFileRefused(f"cannot read {real}: {error}") from None
    if existing is not None:
        try:
            merged = merged_with(path, existing, content)
        except ValueError as error:
            raise _ClientFileRefused(
                f"cannot merge into {real}: {error}; fix it, or move it away and run this again"
            ) from None
        content = merged if merged is not None else content
        if content == existing:
            return [f"unchanged {real}"]
    backup = None
    real.parent.mkdir(parents=True, exist_ok=True)
    temporary = real.with_name(f".{real.name}.moorage-new")
    try:
        temporary.write_text(content)
        if existing is not None:
            info = real.stat()
            os.chmod(temporary, info.st_mode & 0o7777)
            with contextlib.suppress(PermissionError):  # only root gives files away
                os.chown(temporary, info.st_uid, info.st_gid)
            backup = next(
                candidate
                for n in range(1000)
                if not (candidate := real.with_name(f"{real.name}.bak{f'.{n}' if n else ''}")).exists()
            )
            shutil.copy2(real, backup)
        os.replace(temporary, real)
    except OSError:  # nothing of this run stays: not the new file, not a copy of the old
        temporary.unlink(missing_ok=True)
        if backup is not None:
            backup.unlink(missing_ok=True)
        raise
    kept = [f"kept the previous {real.name} as {backup}"] if backup is not None else []
    return [*kept, f"{'updated' if existing is not None else 'wrote'} {real}"]
