"""Client setup snippets: how Docker, containerd, podman/CRI-O, k3s and kind pull through Moorage.

Each generator takes the upstreams to mirror, as configured, and returns files as
``{path: content}``; the command prints them (with a ``# file:`` line before each) or writes
them under a directory. Registries are named to the cache by ``?ns=`` (containerd, k3s, kind
add it) or by a path prefix (podman, Docker's ``pull <moorage>/<registry>/...``): the host, or
a configured prefix where the host has a port (the image name grammar has no ``:``); only
Docker's ``registry-mirrors`` send Docker Hub's paths alone. containerd's fallback ``server``
is the upstream's ``url``. For a cache served over https with a private CA, the CA goes where
each client looks for it (``ca``).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any, Final, Literal
from urllib.parse import urlsplit

import yaml

from moorage.config import UpstreamSettings

__all__ = ["CLIENTS", "CONFIG_DIRS", "Client", "client_files", "client_warnings", "merged_with", "path_prefix"]

Client = Literal["docker", "containerd", "podman", "k3s", "kind"]
Upstreams = Sequence[UpstreamSettings]
#: Where each client's files live; ``--output-dir`` stands for this directory.
CONFIG_DIRS: Final[dict[Client, str]] = {
    "docker": "/etc/docker/",
    "containerd": "/etc/containerd/certs.d/",
    "podman": "/etc/containers/",
    "k3s": "/etc/rancher/k3s/",
    "kind": "",
}
#: The cache's CA for containerd, at the top of certs.d; hosts.toml names it relative to its
#: own directory (containerd resolves it so), which holds wherever certs.d is (kind's nodes).
CONTAINERD_CA: Final = "/etc/containerd/certs.d/moorage-ca.crt"
K3S_CA: Final = "/etc/rancher/k3s/moorage-ca.crt"


@dataclass(frozen=True, slots=True)
class ClientOptions:
    """How the files send a client to the cache."""

    #: The PEM certificate(s) the cache's https certificate is signed by.
    ca: str | None = None
    #: containerd-based clients send every other registry to the cache too (not when only
    #: some upstreams were asked for).
    catch_all: bool = True
    #: containerd-based clients pull from the upstream itself when the cache refuses or fails.
    fallback: bool = True


def path_prefix(upstream: UpstreamSettings) -> str | None:
    """The first path component that routes to ``upstream``: its host, or where the host has a
    port, its first prefix; None when no path component can."""
    if ":" not in upstream.host:
        return upstream.host
    return upstream.prefixes[0] if upstream.prefixes else None


def _unnamed_by_path(upstream: UpstreamSettings, default: str | None) -> bool:
    """No path can name ``upstream`` (a host with a port and no prefix), and bare paths go to
    the default instead: podman cannot mirror it."""
    return path_prefix(upstream) is None and upstream.host != default


def _address(url: str) -> tuple[str, bool]:
    """(host:port, plain http?) of the cache's URL."""
    parts = urlsplit(url)
    return parts.netloc, parts.scheme == "http"


def _docker(url: str, upstreams: Upstreams, default: str | None, options: ClientOptions) -> dict[str, str]:
    ca = options.ca
    address, insecure = _address(url)
    config: dict[str, list[str]] = {"registry-mirrors": [url.rstrip("/")]}
    if insecure:
        config["insecure-registries"] = [address]
    files = {"/etc/docker/daemon.json": json.dumps(config, indent=2) + "\n"}
    if ca is not None:
        files[f"/etc/docker/certs.d/{address}/ca.crt"] = ca
    return files


def _containerd(url: str, upstreams: Upstreams, default: str | None, options: ClientOptions) -> dict[str, str]:
    """One directory per registry name, aliases included, with the cache as its mirror (a
    ``[host]`` without ``push``, to which containerd adds ``?ns=<registry>``); ``_default`` for
    every other name only when the cache mirrors all its upstreams.

    With ``fallback`` the upstream's own ``url`` is the ``server`` containerd turns to when the
    cache refuses or fails. Without, that server may only be pushed to, so pulls go nowhere but
    the cache; and ``_default`` makes the cache the server of every other name (another
    spelling of a registry, ``GHCR.IO`` or ``ghcr.io:443``, would otherwise go around it), so
    registries the cache does not serve cannot be pulled on those nodes."""
    files = {}
    base = url.rstrip("/")
    pulls = 'capabilities = ["pull", "resolve"]\n'
    trust = f'ca = "../{PurePosixPath(CONTAINERD_CA).name}"\n' if options.ca is not None else ""
    mirror = f'[host."{base}"]\n  {pulls}' + (f"  {trust}" if trust else "")
    named: dict[str, UpstreamSettings | None] = {name: u for u in upstreams for name in (u.host, *u.aliases)}
    if options.catch_all:
        named["_default"] = None
    for registry, upstream in named.items():
        if upstream is None:
            server = "" if options.fallback else f'server = "{base}"\n{pulls}{trust}\n'
        elif options.fallback:
            server = f'server = "{upstream.url}"\n\n'
        else:
            server = f'server = "{upstream.url}"\ncapabilities = ["push"]\n\n'
        files[f"/etc/containerd/certs.d/{registry}/hosts.toml"] = server + mirror
    if options.ca is not None:
        files[CONTAINERD_CA] = options.ca
    return files


def _podman(url: str, upstreams: Upstreams, default: str | None, options: ClientOptions) -> dict[str, str]:
    """Every registry through its path prefix, Docker Hub's too: a mirror without one would
    send the cache bare paths, and a Docker Hub namespace named like a configured prefix
    (``quay/tool``) would then be routed to that other upstream."""
    address, insecure = _address(url)
    blocks = [f'unqualified-search-registries = ["{default}"]\n'] if default else []
    for upstream in upstreams:
        prefix = path_prefix(upstream)
        if _unnamed_by_path(upstream, default):
            blocks.append(
                f"# {upstream.host}: its host has a port; give it a prefix in the settings to mirror it here\n"
            )
            continue
        mirror = address if prefix is None else f"{address}/{prefix}"  # no prefix: the default's bare paths
        for registry in (upstream.host, *upstream.aliases):
            block = f'[[registry]]\nprefix = "{registry}"\nlocation = "{registry}"\n\n'
            block += f'[[registry.mirror]]\nlocation = "{mirror}"\n'
            if insecure:
                block += "insecure = true\n"
            blocks.append(block)
    files = {"/etc/containers/registries.conf": "\n".join(blocks)}
    if options.ca is not None:
        files[f"/etc/containers/certs.d/{address}/ca.crt"] = options.ca
    return files


def _k3s(url: str, upstreams: Upstreams, default: str | None, options: ClientOptions) -> dict[str, str]:
    ca = options.ca
    lines = ["mirrors:"]
    for registry in [
        *(name for u in upstreams for name in (u.host, *u.aliases)),
        *(["*"] if options.catch_all else []),
    ]:
        lines += [f'  "{registry}":', "    endpoint:", f'      - "{url.rstrip("/")}"']
    files = {}
    if ca is not None:
        lines += ["configs:", f'  "{_address(url)[0]}":', "    tls:", f'      ca_file: "{K3S_CA}"']
        files[K3S_CA] = ca
    return {"/etc/rancher/k3s/registries.yaml": "\n".join(lines) + "\n", **files}


def _kind(url: str, upstreams: Upstreams, default: str | None, options: ClientOptions) -> dict[str, str]:
    """A kind config that mounts hosts.toml files into every node. kind's node images (v0.27
    on) read registry settings from ``/etc/containerd/certs.d``; the patch sets that path for
    older images too. The CA, if any, is in certs.d, beside the hosts.toml directories."""
    mount = ["    extraMounts:", "      - hostPath: ./certs.d", "        containerPath: /etc/containerd/certs.d"]
    lines = [
        "# Create the cluster from the directory holding certs.d/: kind create cluster --config kind-config.yaml",
        "kind: Cluster",
        "apiVersion: kind.x-k8s.io/v1alpha4",
        "containerdConfigPatches:",
        "  - |-",
        '    [plugins."io.containerd.grpc.v1.cri".registry]',
        '      config_path = "/etc/containerd/certs.d"',
        "nodes:  # give every node you add the same extraMounts",
        "  - role: control-plane",
        *mount,
    ]
    files = {"kind-config.yaml": "\n".join(lines) + "\n"}
    for path, content in _containerd(url, upstreams, default, options).items():
        files[path.replace("/etc/containerd/", "", 1)] = content
    return files


CLIENTS: Final[dict[Client, Callable[[str, Upstreams, str | None, ClientOptions], dict[str, str]]]] = {
    "docker": _docker,
    "containerd": _containerd,
    "podman": _podman,
    "k3s": _k3s,
    "kind": _kind,
}


def client_warnings(
    client: Client,
    url: str,
    upstreams: Upstreams,
    default: str | None = None,
    refuses: bool = False,
    anonymous: bool = True,
) -> list[str]:
    """What the files will not do, when that can be told: each line for stderr. ``refuses``:
    the cache's settings refuse some pulls (users, a policy); ``anonymous``: they let requests
    without credentials pull."""
    warnings = []
    if client == "docker" and not anonymous:
        # dockerd's mirror gets its Docker Hub login (none with the containerd image store), never
        # credentials of the cache's, so each of its pulls is refused and goes to Docker Hub.
        warnings.append(
            "dockerd never signs in to its mirror with credentials of the cache's (it sends its Docker Hub "
            "login, or with the containerd image store none), and these settings refuse pulls without "
            "credentials, so every pull would go to Docker Hub past the cache: set auth.anonymous: pull "
            "(a policy rule can allow anonymous pulls from the hosts' addresses alone)"
        )
    if refuses:
        warnings.append(
            "the cache refuses some pulls, and every client pulls from the upstream itself when its mirror "
            "refuses or fails: the policy holds only where the clients cannot reach the upstreams"
        )
    host = urlsplit(url).hostname or ""
    if client == "kind" and (host == "localhost" or host.startswith("127.") or host == "::1"):
        warnings.append(
            f"kind's nodes are containers, where {host} is the node itself: give an address the nodes "
            "reach, such as the host's address on the kind network (docker network inspect kind)"
        )
    if ":" in host and client != "docker":  # an IPv6 address, in brackets in the URL
        if client == "podman":
            what = "podman 4 refuses a mirror location with an IPv6 address, and fails every pull it mirrors"
        else:
            what = "containerd before 2.0 cannot read an IPv6 address in brackets, and pulls past the cache"
        warnings.append(f"{what}: give the cache a name the nodes resolve (/etc/hosts) and use it in --url")
    if client == "podman":
        for upstream in upstreams:
            if _unnamed_by_path(upstream, default):
                warnings.append(
                    f"{upstream.host} is left out: a path cannot name a host with a port, so give it a prefix "
                    "in the settings (upstreams[].prefixes) to mirror it"
                )
    return warnings


def client_files(
    client: Client, url: str, upstreams: Upstreams, default: str | None = None, options: ClientOptions = ClientOptions()
) -> dict[str, str]:
    """The files that make ``client`` pull ``upstreams``' images through the cache at ``url``;
    ``default`` is the host of the cache's default upstream (which may not be among them)."""
    if "@" in url:  # never repeated: it holds a password
        raise ValueError(
            "the cache's base URL goes into the clients' files as it is: leave the user and password out "
            "(clients sign in to the cache with docker login, or their own credentials)"
        )
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc or parts.path not in ("", "/"):
        raise ValueError(f"not the cache's base URL: {url!r} (expected e.g. http://moorage.example:5000)")
    if options.ca is not None and parts.scheme != "https":
        raise ValueError(f"a CA is for a cache served over https, and {url!r} is plain http")
    if client == "docker" and default != "docker.io":
        # The daemon sends a mirror Hub's paths alone, which the cache routes to its default.
        raise ValueError(
            "Docker's registry-mirrors mirror Docker Hub only, so docker.io must be the default upstream; "
            "pull other registries as <cache>/<registry>/<image> instead"
        )
    if not options.fallback and client not in ("containerd", "kind"):
        raise ValueError(
            f"--no-fallback is for containerd's hosts.toml (containerd, kind); for k3s, start it with "
            f"--disable-default-registry-endpoint; {client} pulls from the upstream when its mirror refuses"
        )
    if not options.fallback and not options.catch_all:
        raise ValueError("--no-fallback sends every registry through the cache; leave out --registries")
    return CLIENTS[client](url, upstreams, default, options)


def merged_with(path: str, existing: str, written: str) -> str | None:
    """The file at ``path`` (as :func:`client_files` names it) with what the cache writes
    merged into its ``existing`` text, for the files that hold a host's other settings too:
    Docker's ``daemon.json`` (log driver, storage, …) and k3s's ``registries.yaml`` (other
    mirrors, credentials under ``configs``). None for files that belong to the cache's setup
    alone. ValueError when the existing file cannot be read as what it should be."""
    name = PurePosixPath(path).name
    if name == "daemon.json":
        return _merged_daemon_json(existing, written)
    if name == "registries.yaml":
        return _merged_registries_yaml(existing, written)
    return None


def _merged_daemon_json(existing: str, written: str) -> str:
    try:
        old = json.loads(existing) if existing.strip() else {}
    except ValueError as exc:
        raise ValueError(f"not valid JSON ({exc})") from None
    if not isinstance(old, dict):
        raise ValueError("not a JSON object")
    new = json.loads(written)
    merged = dict(old)
    for key, values in new.items():  # the cache's entries first: Docker tries mirrors in order
        kept = old.get(key, [])
        if isinstance(kept, str):
            kept = [kept]
        elif not isinstance(kept, list):
            raise ValueError(f"{key} is not a list")
        merged[key] = [*values, *(value for value in kept if value not in values)]
    return json.dumps(merged, indent=2) + "\n"


def _merged_registries_yaml(existing: str, written: str) -> str:
    try:
        old = yaml.safe_load(existing) or {}
    except yaml.YAMLError as exc:
        raise ValueError(f"not valid YAML ({getattr(exc, 'problem', None) or exc})") from None
    if not isinstance(old, dict):
        raise ValueError("not a YAML mapping")
    for section in ("mirrors", "configs"):
        if not isinstance(old.get(section) or {}, dict):
            raise ValueError(f"{section} is not a mapping")
    merged = _deep_merged(old, yaml.safe_load(written))
    return yaml.safe_dump(merged, sort_keys=False, default_flow_style=False)


def _deep_merged(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """``old`` with ``new``'s keys set, mappings in both merged key by key: a registry's
    ``auth`` stays beside the ``tls`` the cache writes for it. A registry's ``endpoint`` list
    gets the cache's first and keeps the host's own after it, as containerd tries them in
    order (so another mirror the host had becomes the next one, as in ``daemon.json``)."""
    merged = dict(old)
    for key, value in new.items():
        kept = old.get(key)
        if isinstance(kept, dict) and isinstance(value, dict):
            merged[key] = _deep_merged(kept, value)
        elif key == "endpoint" and isinstance(kept, list) and isinstance(value, list):
            merged[key] = [*value, *(endpoint for endpoint in kept if endpoint not in value)]
        else:
            merged[key] = value
    return merged
