"""Client setup snippets: how Docker, containerd, podman/CRI-O, k3s and kind pull through Moorage.

Each generator returns files as ``{path: content}``; the command prints them (with a
``# file:`` line before each) or writes them under a directory. Registries other than Docker
Hub are reached by ``?ns=`` (containerd, k3s, kind add it) or by the registry's host as a
path prefix (podman, Docker's ``pull <moorage>/<registry>/...``).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Final, Literal
from urllib.parse import urlsplit

__all__ = ["CLIENTS", "Client", "client_files"]

Client = Literal["docker", "containerd", "podman", "k3s", "kind"]
#: Where each registry's own API lives, for containerd's fallback ``server``.
_SERVERS: Final = {"docker.io": "https://registry-1.docker.io"}


def _server(registry: str) -> str:
    return _SERVERS.get(registry, f"https://{registry}")


def _address(url: str) -> tuple[str, bool]:
    """(host:port, plain http?) of the cache's URL."""
    parts = urlsplit(url)
    return parts.netloc, parts.scheme == "http"


def _docker(url: str, registries: Sequence[str]) -> dict[str, str]:
    address, insecure = _address(url)
    config: dict[str, list[str]] = {"registry-mirrors": [url.rstrip("/")]}
    if insecure:
        config["insecure-registries"] = [address]
    return {"/etc/docker/daemon.json": json.dumps(config, indent=2) + "\n"}


def _containerd(url: str, registries: Sequence[str]) -> dict[str, str]:
    files = {}
    for registry in [*registries, "_default"]:
        server = f'server = "{_server(registry)}"\n\n' if registry != "_default" else ""
        files[f"/etc/containerd/certs.d/{registry}/hosts.toml"] = (
            f'{server}[host."{url.rstrip("/")}"]\n  capabilities = ["pull", "resolve"]\n'
        )
    return files


def _podman(url: str, registries: Sequence[str]) -> dict[str, str]:
    address, insecure = _address(url)
    blocks = ['unqualified-search-registries = ["docker.io"]\n']
    for registry in registries:
        mirror = address if registry == "docker.io" else f"{address}/{registry}"
        block = f'[[registry]]\nprefix = "{registry}"\nlocation = "{registry}"\n\n'
        block += f'[[registry.mirror]]\nlocation = "{mirror}"\n'
        if insecure:
            block += "insecure = true\n"
        blocks.append(block)
    return {"/etc/containers/registries.conf": "\n".join(blocks)}


def _k3s(url: str, registries: Sequence[str]) -> dict[str, str]:
    lines = ["mirrors:"]
    for registry in [*registries, "*"]:
        lines += [f'  "{registry}":', "    endpoint:", f'      - "{url.rstrip("/")}"']
    return {"/etc/rancher/k3s/registries.yaml": "\n".join(lines) + "\n"}


def _kind(url: str, registries: Sequence[str]) -> dict[str, str]:
    lines = [
        "kind: Cluster",
        "apiVersion: kind.x-k8s.io/v1alpha4",
        "containerdConfigPatches:",
        "  - |-",
    ]
    for registry in registries:
        lines += [
            f'    [plugins."io.containerd.grpc.v1.cri".registry.mirrors."{registry}"]',
            f'      endpoint = ["{url.rstrip("/")}"]',
        ]
    return {"kind-config.yaml": "\n".join(lines) + "\n"}


CLIENTS: Final[dict[Client, Callable[[str, Sequence[str]], dict[str, str]]]] = {
    "docker": _docker,
    "containerd": _containerd,
    "podman": _podman,
    "k3s": _k3s,
    "kind": _kind,
}


def client_files(client: Client, url: str, registries: Sequence[str]) -> dict[str, str]:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc or parts.path not in ("", "/"):
        raise ValueError(f"not the cache's base URL: {url!r} (expected e.g. http://moorage.example:5000)")
    return CLIENTS[client](url, registries)
