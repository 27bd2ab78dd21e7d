"""The settings model: every key Moorage reads, its type, default and validation.

One frozen pydantic model per section. Unknown keys are errors (a typo such as ``tag_tll``
must not pass silently). Defaults run with no file at all: Docker Hub as the default upstream
plus the other big public registries, anonymously, on port 5000 of every address with the store in
``./moorage-data``. Each room receives only its own section.
"""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path
from typing import Annotated, Final, Literal
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    IPvAnyNetwork,
    ValidationInfo,
    field_validator,
    model_validator,
)

from ._lifecycle import LifecyclePolicyError, load_lifecycle_policy
from ._units import parse_duration, parse_size

__all__ = [
    "DEFAULT_UPSTREAMS",
    "DURATION_KEYS",
    "AuthSettings",
    "LifecycleBinding",
    "PolicyRule",
    "RetrySettings",
    "Settings",
    "StorageSettings",
    "TimeoutSettings",
    "TlsSettings",
    "UpstreamSettings",
    "split_address",
]

Seconds = Annotated[float, BeforeValidator(parse_duration)]


def _blank_is_unset(value: object) -> object:
    """``password_file: ""`` means no file, not the current directory."""
    return None if isinstance(value, str) and not value.strip() else value


def _blank_is_refused(value: object) -> object:
    if isinstance(value, str) and not value.strip():
        raise ValueError("empty; leave the key out (or write null) to turn it off")
    return value


def _blank_is_no_file(value: object) -> object:
    if isinstance(value, str) and not value.strip():
        raise ValueError("empty: name a file")
    return value


def _home(path: Path | None) -> Path | None:
    """``~/moorage`` as the shell would read it: the user's home, not a directory named ~."""
    return path.expanduser() if path is not None else None


def _size_cap(value: object) -> object:
    """``max_size``: a size, where ``0`` (or an empty value, as ``MOORAGE_STORAGE__MAX_SIZE=``
    writes it) means no cap, as ``0`` turns the intervals off."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    size = parse_size(value)
    if size == 0 and re.search(r"[1-9]", str(value)):
        raise ValueError(f"{value!r} is less than a byte; write 0 (or leave it out) for no cap")
    return size or None


#: A cap on a size: unset, empty or 0 for none.
SizeCap = Annotated[int | None, BeforeValidator(_size_cap)]
#: A file or directory a key must name; an empty value is refused (it read as the current
#: directory: "cannot read .").
RequiredPath = Annotated[Path, BeforeValidator(_blank_is_no_file), AfterValidator(_home)]
#: A file an optional key names; an empty value leaves it unset.
OptionalFile = Annotated[Path | None, BeforeValidator(_blank_is_unset), AfterValidator(_home)]
#: A file whose absence turns a protection off (users, client certificates): an empty value is
#: refused rather than taken as unset, so that an unset template variable fails closed.
GuardFile = Annotated[Path | None, BeforeValidator(_blank_is_refused), AfterValidator(_home)]

_PREFIX_CHARS = set("abcdefghijklmnopqrstuvwxyz0123456789._-")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class StorageSettings(_Section):
    #: Directory holding blobs, manifests, the index and temporaries.
    path: RequiredPath = Path("./moorage-data")
    #: The store's size cap (``50GiB``); least recently used content goes first. Unset or 0:
    #: no cap.
    max_size: SizeCap = None
    #: Above this share of ``max_size`` an eviction pass starts ...
    high_watermark: float = Field(default=0.95, gt=0, le=1)
    #: ... and removes content until the store is below this share.
    low_watermark: float = Field(default=0.85, gt=0, lt=1)
    #: How often lifecycle policies are applied while serving (``0``: never).
    lifecycle_interval: Seconds = Field(default=3600.0, ge=0)
    #: How often garbage collection runs while serving (``0``: never) ...
    gc_interval: Seconds = Field(default=6 * 3600.0, ge=0)
    #: ... sweeping only blobs no manifest has referred to for at least this long, so a pull
    #: whose manifest is not stored yet never loses its layers.
    gc_grace: Seconds = Field(default=3600.0, ge=0)

    @model_validator(mode="after")
    def _watermarks(self) -> StorageSettings:
        if self.low_watermark >= self.high_watermark:
            raise ValueError(
                f"low_watermark ({self.low_watermark}) must be below high_watermark ({self.high_watermark})"
            )
        return self


class TlsSettings(_Section):
    """HTTPS on the listener. Files are PEM; they are read again on SIGHUP and when they change."""

    cert_file: RequiredPath
    key_file: RequiredPath
    #: Require client certificates signed by this CA (mutual TLS); unset: no client certificate.
    client_ca_file: GuardFile = None


class PolicyRule(_Section):
    """One access rule: who, what, allow or deny. The first rule that matches decides."""

    effect: Literal["allow", "deny"]
    description: str = ""
    #: User names from the htpasswd file; ``*`` is any signed-in user.
    users: tuple[str, ...] = ()
    #: Groups from ``auth.groups_file``.
    groups: tuple[str, ...] = ()
    #: Whether the rule covers requests without credentials.
    anonymous: bool = False
    #: Client networks (``10.0.0.0/8``); the rule covers only clients inside one of them.
    cidrs: tuple[IPvAnyNetwork, ...] = ()
    #: Globs over ``<upstream host>/<repository>`` (``docker.io/library/*``, ``nvcr.io/*``).
    repositories: tuple[str, ...] = ("*",)

    @field_validator("cidrs")
    @classmethod
    def _mapped_as_ipv4(cls, networks: tuple[IPvAnyNetwork, ...]) -> tuple[IPvAnyNetwork, ...]:
        """``::ffff:10.0.0.0/104`` as ``10.0.0.0/8``: an IPv4 client of a dual-stack listener is
        matched by its IPv4 address, which no IPv6 network holds, so a deny written so denied
        nothing."""
        return tuple(
            ipaddress.ip_network(f"{network.network_address.ipv4_mapped}/{network.prefixlen - 96}")
            if isinstance(network, ipaddress.IPv6Network)
            and network.prefixlen >= 96
            and network.network_address.ipv4_mapped is not None
            else network
            for network in networks
        )

    @model_validator(mode="after")
    def _someone(self) -> PolicyRule:
        if not self.repositories:
            raise ValueError("repositories: at least one glob (use '*' for every repository)")
        for glob in self.repositories:
            # Hosts and repository names are lower case as requests reach the policy: a glob
            # with a capital never matched, and a deny rule written so let everything through.
            if glob != glob.lower():
                raise ValueError(
                    f"repositories: {glob!r} can never match: names are lower case, write {glob.lower()!r}"
                )
        return self

    def named_registries(self) -> list[tuple[str, str]]:
        """(glob, the registry its first part names) for each glob whose first part has no
        wildcard: ``docker.io/library/*`` names ``docker.io``; ``*/library/*`` names none."""
        heads = [(glob, glob.split("/", 1)[0]) for glob in self.repositories]
        return [(glob, head) for glob, head in heads if not any(mark in head for mark in "*?[")]

    @property
    def who_is_anyone(self) -> bool:
        """No user, group or anonymous named: the rule covers every requester (in ``cidrs``)."""
        return not self.users and not self.groups and not self.anonymous


class AuthSettings(_Section):
    """Who may pull. With no ``htpasswd_file`` everyone may (the cache's default)."""

    #: Users and bcrypt hashes, as ``htpasswd -B`` writes them; reloaded when the file changes.
    htpasswd_file: GuardFile = None
    #: Groups of those users, one per line: ``group: user1 user2`` (Apache's AuthGroupFile).
    groups_file: OptionalFile = None
    #: ``pull``: requests without credentials may pull; ``none``: they get 401. Unset: ``none``
    #: when ``htpasswd_file`` is set, ``pull`` otherwise.
    anonymous: Literal["pull", "none"] | None = None
    #: Lifetime of the tokens ``/token`` and ``moorage login-password`` issue.
    token_lifetime: Seconds = Field(default=12 * 3600.0, ge=60, le=31 * 86400)
    #: The ES256 key tokens are signed with (PKCS#8 PEM). Unset: ``<storage.path>/auth/token-key.pem``,
    #: generated at the first start. Processes serving one store share the key.
    token_signing_key_file: OptionalFile = None
    #: The token service's URL as clients reach it (``https://cache.example/token``). Unset:
    #: built from each request's scheme and Host header.
    token_realm: str | None = None
    #: Failed sign-ins allowed per client address and minute, on /token and /v2/ alike (sign-ins
    #: that succeed and anonymous token requests cost nothing).
    token_requests_per_minute: int = Field(default=120, ge=1)
    #: Access rules, evaluated in order; the first that matches decides, none matching allows.
    policy: tuple[PolicyRule, ...] = ()

    @field_validator("token_realm")
    @classmethod
    def _token_realm(cls, value: str | None) -> str | None:
        """Clients take the realm as the URL to sign in at: one that is no http(s) URL fails
        every sign-in (skopeo: unsupported protocol scheme)."""
        if value is None:
            return None
        try:
            parts = urlsplit(value)
            port_ok = parts.port != 0  # raises on a port out of range, or an IPv6 address unbracketed
        except ValueError:
            parts, port_ok = urlsplit(""), False
        if parts.scheme not in ("http", "https") or not parts.hostname or "@" in value or not port_ok:
            shown = "" if "@" in value else f": {value[:100]!r}"  # no user:pass@host
            raise ValueError(
                f"not a URL clients can sign in at{shown} (expected e.g. https://cache.example/token or"
                " http://[fd00::1]:5000/token, no credentials)"
            )
        return value

    @model_validator(mode="after")
    def _someone_may_pull(self) -> AuthSettings:
        if self.anonymous == "none" and self.htpasswd_file is None:
            raise ValueError(
                "anonymous: 'none' without an htpasswd_file refuses every pull (no user can sign in):"
                " set htpasswd_file, or leave anonymous unset"
            )
        return self

    @property
    def anonymous_may_pull(self) -> bool:
        if self.anonymous is not None:
            return self.anonymous == "pull"
        return self.htpasswd_file is None

    @property
    def refuses_some_pulls(self) -> bool:
        """Whether some client may be refused: anonymous pulls are not allowed, or a rule
        denies (a policy of allow rules alone refuses nothing: no match means allowed)."""
        return not self.anonymous_may_pull or any(rule.effect == "deny" for rule in self.policy)


class TimeoutSettings(_Section):
    """httpx's four timeouts. ``read`` is idle time between chunks, never a total deadline."""

    connect: Seconds = Field(default=10.0, gt=0)
    read: Seconds = Field(default=60.0, gt=0)
    write: Seconds = Field(default=60.0, gt=0)
    pool: Seconds = Field(default=30.0, gt=0)


class RetrySettings(_Section):
    """Retries before any byte reached a client: connect errors, 5xx and 429."""

    attempts: int = Field(default=3, ge=1, le=10)
    #: Longest wait between two attempts; a 429 whose Retry-After is longer fails at once
    #: (and the cache answers from what it holds, if anything).
    max_wait: Seconds = 5.0


class LifecycleBinding(_Section):
    """An ECR lifecycle policy file and the repositories of one upstream it applies to."""

    #: A glob over repository names (``library/*``, ``myorg/**`` is the same as ``myorg/*``).
    repositories: str = "*"
    policy_file: RequiredPath

    @field_validator("repositories")
    @classmethod
    def _lower_case(cls, value: str) -> str:
        if value != value.lower():  # as the access policy's globs: it never matched, silently
            raise ValueError(f"{value!r} can never match: repository names are lower case, write {value.lower()!r}")
        return value

    @model_validator(mode="after")
    def _readable(self, info: ValidationInfo) -> LifecycleBinding:
        _check_policy(self.policy_file, info)
        return self


#: Validation context of settings checked away from the machine that serves them.
SKIP_FILES: Final = "skip_files"
#: Validation context of settings loaded by a command that reads no policy, or reads each
#: where it uses it (``login-password``, ``ls``, ``lifecycle preview``): a policy file a live
#: edit broke holds back its own repositories in the daemon, not every other command.
SKIP_POLICIES: Final = "skip_policies"


def _check_policy(path: Path, info: ValidationInfo) -> None:
    """A policy file must load when the settings do (it is read again at every pass). Checked
    away from the serving machine (``SKIP_FILES``), one that is not there is passed over;
    with ``SKIP_POLICIES``, none is read."""
    if info.context and info.context.get(SKIP_POLICIES):
        return
    if info.context and info.context.get(SKIP_FILES) and not path.exists():
        return
    try:
        load_lifecycle_policy(path)
    except LifecyclePolicyError as exc:
        raise ValueError(str(exc)) from None


class UpstreamSettings(_Section):
    #: The registry's name in image references and in containerd's ``?ns=``.
    host: str
    #: Where its API lives (``https://registry-1.docker.io``).
    url: str
    #: Answers ``/v2/<name>/...`` that carry no prefix and no ``ns``.
    default: bool = False
    #: Other names for this registry accepted in ``?ns=`` and as a path prefix.
    aliases: tuple[str, ...] = ()
    #: Extra path prefixes (``/v2/<prefix>/<repository>/...``); the host always works as one.
    prefixes: tuple[str, ...] = ()
    username: str = ""
    #: A file holding the password or token for ``username``; read at start, never logged.
    password_file: OptionalFile = None
    #: Or the name of an environment variable holding it (CI service containers, where a
    #: secret arrives as a variable and no file can be mounted); read at start, never logged.
    password_env: str | None = None
    #: PEM CA certificates trusted for this upstream's TLS (a private registry's own CA),
    #: beside the public CAs and the system's store.
    ca_file: OptionalFile = None
    #: Freshness of a tag answer for this upstream; the global ``tag_ttl`` when unset.
    tag_ttl: Seconds | None = None
    #: Add ``library/`` to one-component names (Docker Hub's official images).
    #: Unset: on for docker.io, off for every other upstream.
    library_prefix: bool | None = None
    timeouts: TimeoutSettings = TimeoutSettings()
    retries: RetrySettings = RetrySettings()
    #: Blob downloads from this upstream at once; more wait their turn.
    max_concurrent_fills: int = Field(default=32, ge=1, le=1024)
    #: Once a client asks for a layer of an image whose manifest came from this upstream, the
    #: image's other blobs are fetched ahead of it, up to this many at a time per image (one
    #: while downloads come fast and soon; ``0``: never), across images at most half of
    #: ``max_concurrent_fills``.
    prefetch_blobs: int = Field(default=3, ge=0, le=64)
    #: An ECR lifecycle policy for every repository of this upstream (the same JSON).
    lifecycle_policy_file: OptionalFile = None
    #: Policies for repository globs; the first match wins, before ``lifecycle_policy_file``.
    lifecycle_policies: tuple[LifecycleBinding, ...] = ()

    @field_validator("password_env")
    @classmethod
    def _variable_name(cls, value: str | None) -> str | None:
        if not value:  # "" as for password_file: none
            return None
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", value):  # not echoed: it may be the token itself
            raise ValueError("must be the name of an environment variable (letters, digits, _), not the password")
        return value

    @model_validator(mode="after")
    def _one_password(self) -> UpstreamSettings:
        if self.password_file is not None and self.password_env is not None:
            raise ValueError("set password_file or password_env, not both")
        if (self.password_file is not None or self.password_env is not None) and not self.username:
            raise ValueError("a password is sent only with a username: set username too")
        return self

    @field_validator("lifecycle_policy_file")
    @classmethod
    def _policy_readable(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        if value is not None:
            _check_policy(value, info)
        return value

    @model_validator(mode="after")
    def _bindings_can_match(self) -> UpstreamSettings:
        """Globs that can never match this upstream's repository names, refused as the access
        policy's are: an ECR user writing the host form of ``auth.policy`` (``ghcr.io/team/*``),
        or Docker Hub's short name (``alpine``, stored as ``library/alpine``), had a policy
        that never applied, and the preview's "0 images would expire" looked like success."""
        hosts = {name for name in (self.host, *self.aliases) if "." in name or ":" in name}
        for position, binding in enumerate(self.lifecycle_policies):
            glob, key = binding.repositories, f"lifecycle_policies[{position}].repositories"
            head, _, rest = glob.partition("/")
            if head in hosts and rest:
                raise ValueError(
                    f"{key}: {glob!r} names this upstream's host; the globs here are over its repository"
                    f" names alone: write {rest!r}"
                )
            if self.adds_library_prefix and "/" not in glob and glob[:1] not in ("*", "?", "["):
                raise ValueError(
                    f"{key}: {glob!r} can never match: one-component names of this upstream are stored as"
                    f" library/<name>: write 'library/{glob}'"
                )
        return self

    @property
    def lifecycle(self) -> tuple[LifecycleBinding, ...]:
        """Every policy binding of this upstream, most specific first."""
        if self.lifecycle_policy_file is None:
            return self.lifecycle_policies
        # Checked when the settings loaded: no second read of the file here.
        every = LifecycleBinding.model_construct(repositories="*", policy_file=self.lifecycle_policy_file)
        return (*self.lifecycle_policies, every)

    @field_validator("host")
    @classmethod
    def _host(cls, value: str) -> str:
        return _host_name(value)

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        parts = urlsplit(value)
        # The URL is echoed only as far as the host and path: credentials and a query (a token
        # in it) would go to the log of every start that fails. Any "@" is taken for them: a
        # password with a "/" in it ends the address before its "@", where urlsplit finds none.
        if "@" in value or parts.username is not None or parts.password is not None:
            raise ValueError("credentials do not go in the URL: set username and password_file or password_env")
        if parts.scheme not in ("http", "https") or not parts.hostname or any(c.isspace() for c in value):
            bare = re.split(r"[?#]", value, maxsplit=1)[0]
            shown = "" if "@" in value else f": {bare!r}"  # no user:pass@host
            raise ValueError(f"not a URL{shown} (expected http://… or https://…)")
        if parts.query or parts.fragment:
            raise ValueError(
                f"not a registry URL: {parts.scheme}://{parts.netloc}{parts.path} has a query or fragment;"
                " give the registry's address alone"
            )
        try:
            port = parts.port  # raises on a port out of range or not a number
        except ValueError:
            port = 0
        if port == 0:
            raise ValueError(f"not a registry URL: {value!r} has no port from 1 to 65535 after its host")
        if parts.path.rstrip("/").endswith("/v2"):
            raise ValueError(
                f"not a registry URL: {value!r} ends in /v2, which the cache adds itself; give the registry's address"
            )
        return value.rstrip("/")

    @field_validator("aliases")
    @classmethod
    def _aliases(cls, values: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(_host_name(value) for value in values)

    @field_validator("prefixes")
    @classmethod
    def _prefixes(cls, values: tuple[str, ...]) -> tuple[str, ...]:
        for value in values:
            if not value or not set(value) <= _PREFIX_CHARS or not value[0].isalnum():
                raise ValueError(f"not a path prefix: {value!r} (one lowercase name component, e.g. docker-hub)")
        return values

    @property
    def adds_library_prefix(self) -> bool:
        if self.library_prefix is not None:
            return self.library_prefix
        return self.host == "docker.io"


#: A registry host as the reference grammar writes one: DNS labels joined by dots, or an IPv6
#: address in brackets, and an optional port. Labels may hold "_" too (a compose service's
#: name), which earlier versions took and a route by prefix or default still reaches.
_REGISTRY_HOST: Final = re.compile(
    r"(?:[a-z0-9_](?:[a-z0-9_-]*[a-z0-9_])?(?:\.[a-z0-9_](?:[a-z0-9_-]*[a-z0-9_])?)*|\[[0-9a-f:.]+\])(?::([0-9]+))?"
)


def _host_name(value: str) -> str:
    """A registry's name as image references and ``?ns=`` give it (``ghcr.io``,
    ``registry.local:5000``), lowercased."""
    value = value.strip().lower()
    host = _REGISTRY_HOST.fullmatch(value)
    port = host[1].lstrip("0") if host is not None and host[1] is not None else None
    if host is None or (port is not None and not (len(port) <= 5 and 0 < int(port or "0") < 65536)):
        raise ValueError(f"not a registry host name: {value!r} (expected e.g. ghcr.io)")
    if value.startswith("[") and not _is_ipv6(value[1 : value.index("]")]):
        raise ValueError(f"not a registry host name: {value!r} (no IPv6 address in its brackets)")
    return value


DEFAULT_UPSTREAMS: tuple[UpstreamSettings, ...] = (
    UpstreamSettings(
        host="docker.io",
        url="https://registry-1.docker.io",
        default=True,
        aliases=("registry-1.docker.io", "index.docker.io"),
        prefixes=("docker-hub",),
    ),
    UpstreamSettings(host="ghcr.io", url="https://ghcr.io", prefixes=("ghcr",)),
    UpstreamSettings(host="quay.io", url="https://quay.io", prefixes=("quay",)),
    UpstreamSettings(host="registry.k8s.io", url="https://registry.k8s.io", aliases=("k8s.gcr.io",), prefixes=("k8s",)),
    UpstreamSettings(host="gcr.io", url="https://gcr.io", prefixes=("gcr",)),
    UpstreamSettings(host="public.ecr.aws", url="https://public.ecr.aws", prefixes=("ecr-public",)),
    UpstreamSettings(host="mcr.microsoft.com", url="https://mcr.microsoft.com", prefixes=("mcr",)),
)


#: TCP_USER_TIMEOUT is an unsigned int of milliseconds, which Linux reads as a signed one.
MAX_SEND_TIMEOUT: Final = (2**31 - 1) // 1000


class Settings(_Section):
    #: ``host:port`` to listen on; no host (``:5000``): every address, IPv4 and IPv6.
    listen: str = ":5000"
    storage: StorageSettings = StorageSettings()
    #: Default freshness of a tag→digest answer; older answers are revalidated with HEAD.
    tag_ttl: Seconds = 900.0
    #: Freshness of a cached ``tags/list`` answer.
    tags_list_ttl: Seconds = 60.0
    #: Freshness of a cached referrers list (signatures, SBOMs and attestations of a digest).
    referrers_ttl: Seconds = 60.0
    #: How long a stale tag's revalidation may take before the stale answer is served instead.
    revalidate_timeout: Seconds = 5.0
    #: After a failed revalidation, how long the stale answer is served without asking again.
    stale_backoff: Seconds = 30.0
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    #: ``json`` lines, ``text`` for people, or ``auto``: text on a terminal, JSON otherwise.
    log_format: Literal["auto", "json", "text"] = "auto"
    #: Serve ``/metrics`` on this ``host:port`` instead of the main listener (unset: main).
    metrics_listen: str | None = None
    #: HTTPS on ``listen`` (unset: plain HTTP; terminate TLS in front instead).
    tls: TlsSettings | None = None
    auth: AuthSettings = AuthSettings()
    #: On SIGTERM, how long /readyz fails while requests are still taken, before the stop
    #: begins (load balancers and Kubernetes Services stop sending meanwhile).
    shutdown_delay: Seconds = Field(default=0.0, ge=0)
    #: How long shutdown waits for requests in flight before closing them.
    shutdown_timeout: Seconds = 30.0
    #: A client connection with no complete request for this long is closed (idle keep-alive
    #: connections, and clients sending their request head byte by byte). Above the 60 s a
    #: proxy in front keeps idle connections (ingress-nginx, AWS ALB), or it races their reuse.
    client_idle_timeout: Seconds = Field(default=75.0, gt=0)
    #: A client connection whose sent data stays unacknowledged, or unsent because the client
    #: stopped reading, for this long is closed by the kernel (TCP_USER_TIMEOUT); 0: never.
    client_send_timeout: Seconds = Field(default=120.0, ge=0, le=MAX_SEND_TIMEOUT)
    upstreams: tuple[UpstreamSettings, ...] = DEFAULT_UPSTREAMS

    @field_validator("listen", "metrics_listen", mode="before")
    @classmethod
    def _port_alone(cls, value: object) -> object:
        if isinstance(value, int) and not isinstance(value, bool):  # listen: 5000
            raise ValueError(f'must be host:port, quoted, e.g. ":{value}" (every address), not {value}')
        return value

    @field_validator("listen", "metrics_listen")
    @classmethod
    def _listen(cls, value: str | None) -> str | None:
        if value is None:
            return None
        host, sep, port = value.rpartition(":")
        if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
            raise ValueError(
                f"not a listen address: {value!r} (expected host:port, e.g. :5000 for every address, 0.0.0.0:5000)"
            )
        bracketed = host.startswith("[") and host.endswith("]")
        if ":" in host and not bracketed:  # fd00::2:5000: which part is the port?
            raise ValueError(f"not a listen address: {value!r} (an IPv6 address goes in brackets: [{host}]:{port})")
        if bracketed and not _is_ipv6(host[1:-1]):
            raise ValueError(f"not a listen address: {value!r} ({host} is no IPv6 address)")
        return value

    @field_validator("metrics_listen")
    @classmethod
    def _metrics_apart(cls, value: str | None, info: ValidationInfo) -> str | None:
        """Not the pull listener's address: serve failed at start blaming another process."""
        listen = info.data.get("listen")
        if value is None or listen is None:
            return value
        (host, port), (pull_host, pull_port) = split_address(value), split_address(listen)
        every = {"", "0.0.0.0", "::"}
        if port == pull_port != 0 and (_same_host(host, pull_host) or host in every or pull_host in every):
            raise ValueError(
                f"{value!r} is the address listen takes ({listen!r}): give the metrics a port of their own,"
                " or leave metrics_listen unset to serve /metrics on listen"
            )
        return value

    @field_validator("upstreams")
    @classmethod
    def _upstreams(cls, values: tuple[UpstreamSettings, ...]) -> tuple[UpstreamSettings, ...]:
        """Checked with the upstreams alone, so that the check is reported beside errors in
        other sections, not only once they are fixed."""
        if not values:
            raise ValueError("at least one upstream is needed (leave the key out for the built-in ones)")
        defaults = [u.host for u in values if u.default]
        if len(defaults) > 1:
            raise ValueError(f"more than one default upstream ({', '.join(defaults)})")
        hosts = [u.host for u in values]
        if twice := sorted({host for host in hosts if hosts.count(host) > 1}):
            raise ValueError(f"more than one upstream has host {', '.join(twice)}: one entry per registry")
        seen: dict[str, str] = {}
        for upstream in values:
            for name in {upstream.host, *upstream.aliases, *upstream.prefixes}:
                if name in seen and seen[name] != upstream.host:
                    raise ValueError(f"{name!r} names both {seen[name]} and {upstream.host}")
                seen[name] = upstream.host
        return values

    @model_validator(mode="after")
    def _policy_names_upstreams(self) -> Settings:
        """Globs are over ``<upstream host>/<repository>`` as routed: one whose first part is an
        alias or a prefix (``k8s.gcr.io/*``, ``ghcr/*``) or no host at all (``library/*``) could
        never match. (A host that is simply not configured here is only warned of, at start:
        a policy may be shared by caches with different upstreams.)"""
        named = {name: u.host for u in self.upstreams for name in (*u.aliases, *u.prefixes)}
        hosts = {upstream.host for upstream in self.upstreams}
        problems = []
        for index, rule in enumerate(self.auth.policy):
            for glob, head in rule.named_registries():
                if head in hosts:
                    continue
                if head in named:
                    problems.append(
                        f"auth.policy[{index}].repositories: {glob!r} can never match: {head!r} names "
                        f"{named[head]}, and globs are over the upstream's host ({named[head]}/...)"
                    )
                elif not _host_like(head):
                    problems.append(
                        f"auth.policy[{index}].repositories: {glob!r} can never match: globs are over "
                        f"<upstream host>/<repository>, e.g. 'docker.io/library/*' (hosts in lower case)"
                    )
        if problems:
            raise ValueError("\n  ".join(problems))
        return self

    @property
    def listen_host(self) -> str:
        return split_address(self.listen)[0]

    @property
    def listen_port(self) -> int:
        return split_address(self.listen)[1]

    @property
    def default_host(self) -> str | None:
        """The host of the default upstream (short names and bare paths go there), if any."""
        return next((upstream.host for upstream in self.upstreams if upstream.default), None)

    def tag_ttl_of(self, upstream: UpstreamSettings) -> float:
        return self.tag_ttl if upstream.tag_ttl is None else upstream.tag_ttl


def _host_like(name: str) -> bool:
    """A registry host as image references write one: a dot or a port, or ``localhost``."""
    return name == "localhost" or "." in name or ":" in name


def split_address(value: str) -> tuple[str, int]:
    """(host, port) of a validated ``host:port``, an IPv6 address without its brackets; an
    empty host means every address, IPv4 and IPv6."""
    host, _, port = value.rpartition(":")
    return host.strip("[]"), int(port)


def _is_ipv6(text: str) -> bool:
    try:
        return isinstance(ipaddress.ip_address(text), ipaddress.IPv6Address)
    except ValueError:
        return False


def _same_host(one: str, other: str) -> bool:
    """Whether two listen hosts are one (``::1`` and ``0:0::1`` are)."""
    try:
        return ipaddress.ip_address(one) == ipaddress.ip_address(other)
    except ValueError:
        return one == other


def _duration_keys(*sections: type[BaseModel]) -> frozenset[str]:
    """Keys whose values are durations, so that errors about their bounds speak of seconds."""
    return frozenset(
        name
        for section in sections
        for name, field in section.model_fields.items()
        if any(getattr(rule, "func", None) is parse_duration for rule in field.metadata)
    )


DURATION_KEYS: Final = _duration_keys(Settings, StorageSettings, AuthSettings, TimeoutSettings, RetrySettings)
