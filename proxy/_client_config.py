"""Client setup snippets: how Docker, containerd, podman/CRI-O, k3s and kind pull through Moorage.

Each generator takes the upstreams to mirror, as configured, and returns files as
``{path: content}``; the command prints them (with a ``# file:`` line before each) or writes
them under a directory. Registries other than the default upstream are reached by ``?ns=``
(containerd, k3s, kind add it) or by a path prefix (podman, Docker's ``pull
<moorage>/<registry>/...``): the host, or a configured prefix where the host has a port (the
image name grammar has no ``:``). containerd's fallback ``server`` is the upstream's ``url``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Final, Literal
from urllib.parse import urlsplit

from moorage.config import UpstreamSettings

__all__ = ["CLIENTS", "Client", "client_files", "path_prefix"]

Client = Literal["docker", "containerd", "podman", "k3s", "kind"]
Upstreams = Sequence[UpstreamSettings]


def path_prefix(upstream: UpstreamSettings) -> str | None:
    """The first path component that routes to ``upstream``: its host, or where the host has a
    port, its first prefix; None when no path component can."""
    if ":" not in upstream.host:
        return upstream.host
    return upstream.prefixes[0] if upstream.prefixes else None


def _address(url: str) -> tuple[str, bool]:
    """(host:port, plain http?) of the cache's URL."""
    parts = urlsplit(url)
    return parts.netloc, parts.scheme == "http"


def _docker(url: str, upstreams: Upstreams, default: str | None) -> dict[str, str]:
    address, insecure = _address(url)
    config: dict[str, list[str]] = {"registry-mirrors": [url.rstrip("/")]}
    if insecure:
        config["insecure-registries"] = [address]
    return {"/etc/docker/daemon.json": json.dumps(config, indent=2) + "\n"}


def _containerd(url: str, upstreams: Upstreams, default: str | None) -> dict[str, str]:
    files = {}
    servers: dict[str, str | None] = {u.host: u.url for u in upstreams}
    for registry, server in [*servers.items(), ("_default", None)]:
        fallback = f'server = "{server}"\n\n' if server is not None else ""
        files[f"/etc/containerd/certs.d/{registry}/hosts.toml"] = (
            f'{fallback}[host."{url.rstrip("/")}"]\n  capabilities = ["pull", "resolve"]\n'
        )
    return files


def _podman(url: str, upstreams: Upstreams, default: str | None) -> dict[str, str]:
    address, insecure = _address(url)
    blocks = [f'unqualified-search-registries = ["{default}"]\n'] if default else []
    for upstream in upstreams:
        registry, prefix = upstream.host, path_prefix(upstream)
        routed_by_default = registry == default
        if not routed_by_default and prefix is None:
            blocks.append(f"# {registry}: its host has a port; give it a prefix in the settings to mirror it here\n")
            continue
        mirror = address if routed_by_default else f"{address}/{prefix}"
        block = f'[[registry]]\nprefix = "{registry}"\nlocation = "{registry}"\n\n'
        block += f'[[registry.mirror]]\nlocation = "{mirror}"\n'
        if insecure:
            block += "insecure = true\n"
        blocks.append(block)
    return {"/etc/containers/registries.conf": "\n".join(blocks)}


def _k3s(url: str, upstreams: Upstreams, default: str | None) -> dict[str, str]:
    lines = ["mirrors:"]
    for registry in [*(u.host for u in upstreams), "*"]:
        lines += [f'  "{registry}":', "    endpoint:", f'      - "{url.rstrip("/")}"']
    return {"/etc/rancher/k3s/registries.yaml": "\n".join(lines) + "\n"}


def _kind(url: str, upstreams: Upstreams, default: str | None) -> dict[str, str]:
    """A kind config that mounts hosts.toml files into every node. kind's node images (v0.20
    on) read registry settings from ``/etc/containerd/certs.d`` and refuse the older
    ``registry.mirrors`` beside it; the patch sets that path for older images too."""
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
    for path, content in _containerd(url, upstreams, default).items():
        files[path.replace("/etc/containerd/", "", 1)] = content
    return files


CLIENTS: Final[dict[Client, Callable[[str, Upstreams, str | None], dict[str, str]]]] = {
    "docker": _docker,
    "containerd": _containerd,
    "podman": _podman,
    "k3s": _k3s,
    "kind": _kind,
}


def client_files(client: Client, url: str, upstreams: Upstreams, default: str | None = None) -> dict[str, str]:
    """The files that make ``client`` pull ``upstreams``' images through the cache at ``url``;
    ``default`` is the host of the cache's default upstream (which may not be among them)."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc or parts.path not in ("", "/"):
        raise ValueError(f"not the cache's base URL: {url!r} (expected e.g. http://moorage.example:5000)")
    if client == "docker" and default != "docker.io":
        # The daemon sends a mirror Hub's paths alone, which the cache routes to its default.
        raise ValueError(
            "Docker's registry-mirrors mirror Docker Hub only, so docker.io must be the default upstream; "
            "pull other registries as <cache>/<registry>/<image> instead"
        )
    return CLIENTS[client](url, upstreams, default)
