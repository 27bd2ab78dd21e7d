"""Deterministic test images: OCI layouts on disk, pushing them, reading them back.

* :func:`write_oci_image` / :func:`write_oci_index` write an OCI image layout
  (``oci-layout``, ``index.json``, ``blobs/sha256/...``) whose layers are real
  (gzip-compressed by default) tar archives, so podman and containerd can unpack them.
  The same arguments always give the same bytes, hence the same digests.
* :func:`push` copies a tag of such a layout to a registry with skopeo (optionally
  converting to Docker schema 2) and returns what the registry then holds, read back
  through its HTTP API by :func:`inspect_image`.
* :func:`push_blob` / :func:`push_manifest` talk to the registry API directly;
  ``push_blob`` streams from a file, for blobs too large to hold in memory, and
  :func:`write_random_file` makes such a file.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import random
import subprocess
import tarfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, BinaryIO

from .httpclient import request
from .tools import require_tool

__all__ = [
    "DOCKER_LAYER_GZIP",
    "DOCKER_MANIFEST",
    "DOCKER_MANIFEST_LIST",
    "MANIFEST_ACCEPT",
    "OCI_INDEX",
    "OCI_LAYER",
    "OCI_LAYER_GZIP",
    "OCI_MANIFEST",
    "ImageRef",
    "Platform",
    "inspect_image",
    "layer_tar",
    "push",
    "push_blob",
    "push_manifest",
    "random_layer",
    "sha256_digest",
    "write_oci_image",
    "write_oci_index",
    "write_random_file",
]

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"

INDEX_TYPES = frozenset({OCI_INDEX, DOCKER_MANIFEST_LIST})
#: ``Accept`` header asking a registry for any of the four current manifest types.
MANIFEST_ACCEPT = f"{OCI_INDEX}, {DOCKER_MANIFEST_LIST}, {OCI_MANIFEST}, {DOCKER_MANIFEST}"

#: ``(os, arch)`` or ``(os, arch, variant)``, e.g. ``("linux", "arm", "v7")``.
Platform = tuple[str, str] | tuple[str, str, str]

_CHUNK = 8 << 20


@dataclass(frozen=True)
class ImageRef:
    """Digests of an image or an index, as stored in a layout or a registry.

    For an image: ``config_digest`` and ``layer_digests`` are set, ``children`` empty.
    For an index (OCI index or Docker manifest list): ``config_digest`` is ``None``,
    ``layer_digests`` is empty, ``child_manifest_digests`` and ``children`` describe the
    per-platform images (same order as in the index). :attr:`blob_digests` collects the
    config and layer digests of an image and of all children of an index.
    """

    manifest_digest: str
    media_type: str
    manifest_size: int
    raw_manifest: bytes = field(repr=False)
    config_digest: str | None = None
    config_size: int | None = None
    layer_digests: tuple[str, ...] = ()
    layer_sizes: tuple[int, ...] = ()
    layer_media_types: tuple[str, ...] = ()
    child_manifest_digests: tuple[str, ...] = ()
    children: tuple[ImageRef, ...] = ()
    platform: str | None = None  # "os/arch[/variant]" where known

    @property
    def is_index(self) -> bool:
        return self.media_type in INDEX_TYPES

    @property
    def blob_digests(self) -> tuple[str, ...]:
        """Config and layer digests (of every child, for an index), without duplicates."""
        seen: dict[str, None] = {}
        for image in self.children or (self,):
            if image.config_digest is not None:
                seen.setdefault(image.config_digest)
            for digest in image.layer_digests:
                seen.setdefault(digest)
        return tuple(seen)

    def child(self, platform: str) -> ImageRef:
        """The child image of an index for ``platform`` (``"linux/arm64"``)."""
        for image in self.children:
            if image.platform == platform:
                return image
        raise KeyError(f"no child for {platform!r} in {[c.platform for c in self.children]}")


# -- blobs and layers ----------------------------------------------------------------


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def random_layer(size: int, seed: int) -> bytes:
    """``size`` deterministic, incompressible bytes (same ``seed`` -> same bytes)."""
    return random.Random(seed).randbytes(size)


def layer_tar(content: bytes, *, compress: bool = True, name: str | None = None) -> tuple[bytes, str]:
    """A deterministic layer archive holding one file with ``content``.

    The file is ``moorage/<name>`` (default: the first 16 hex digits of the content's
    sha256 plus ``.bin``, so equal contents give equal layers and different layers do not
    overwrite each other's file). Returns ``(blob, diff_id)``: the (gzip'd) archive and
    the digest of the uncompressed tar.
    """
    fname = name or hashlib.sha256(content).hexdigest()[:16] + ".bin"
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        d = tarfile.TarInfo("moorage")
        d.type = tarfile.DIRTYPE
        d.mode = 0o755
        d.mtime = 0
        tar.addfile(d)
        info = tarfile.TarInfo(f"moorage/{fname}")
        info.size = len(content)
        info.mode = 0o644
        info.mtime = 0
        tar.addfile(info, io.BytesIO(content))
    raw = buf.getvalue()
    diff_id = sha256_digest(raw)
    if not compress:
        return raw, diff_id
    return gzip.compress(raw, compresslevel=6, mtime=0), diff_id


def _canonical_json(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def _write_blob(layout_dir: Path, data: bytes) -> tuple[str, int]:
    digest = sha256_digest(data)
    path = layout_dir / "blobs" / "sha256" / digest.removeprefix("sha256:")
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(data)
        tmp.replace(path)
    return digest, len(data)


def _init_layout(layout_dir: Path) -> None:
    layout_dir.mkdir(parents=True, exist_ok=True)
    (layout_dir / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
    marker = layout_dir / "oci-layout"
    if not marker.exists():
        marker.write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))


def _tag_in_layout(layout_dir: Path, tag: str, descriptor: dict[str, Any]) -> None:
    index_path = layout_dir / "index.json"
    index: dict[str, Any] = {"schemaVersion": 2, "manifests": []}
    if index_path.exists():
        index = json.loads(index_path.read_text())
    ref_key = "org.opencontainers.image.ref.name"
    index["manifests"] = [m for m in index.get("manifests", []) if m.get("annotations", {}).get(ref_key) != tag]
    index["manifests"].append({**descriptor, "annotations": {ref_key: tag}})
    index_path.write_text(json.dumps(index, indent=2))


def _platform_dict(platform: Platform) -> dict[str, str]:
    out = {"os": platform[0], "architecture": platform[1]}
    if len(platform) == 3:
        out["variant"] = platform[2]
    return out


def _platform_str(platform: Mapping[str, Any]) -> str:
    parts = [str(platform.get("os", "")), str(platform.get("architecture", ""))]
    if platform.get("variant"):
        parts.append(str(platform["variant"]))
    return "/".join(parts)


def _write_image_blobs(
    layout_dir: Path,
    layers: Sequence[bytes],
    platform: Platform,
    *,
    config_extra: Mapping[str, Any] | None,
    compress: bool,
) -> ImageRef:
    layer_descs: list[dict[str, Any]] = []
    diff_ids: list[str] = []
    for content in layers:
        blob, diff_id = layer_tar(content, compress=compress)
        digest, size = _write_blob(layout_dir, blob)
        layer_descs.append(
            {
                "mediaType": OCI_LAYER_GZIP if compress else OCI_LAYER,
                "digest": digest,
                "size": size,
            }
        )
        diff_ids.append(diff_id)
    config: dict[str, Any] = {
        **_platform_dict(platform),
        "created": "1970-01-01T00:00:00Z",
        "config": {"Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"]},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": [
            {"created": "1970-01-01T00:00:00Z", "created_by": f"moorage test layer {i}"} for i in range(len(layers))
        ],
    }
    config.update(config_extra or {})
    config_digest, config_size = _write_blob(layout_dir, _canonical_json(config))
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {
            "mediaType": OCI_CONFIG,
            "digest": config_digest,
            "size": config_size,
        },
        "layers": layer_descs,
    }
    raw = _canonical_json(manifest)
    digest, size = _write_blob(layout_dir, raw)
    return ImageRef(
        manifest_digest=digest,
        media_type=OCI_MANIFEST,
        manifest_size=size,
        raw_manifest=raw,
        config_digest=config_digest,
        config_size=config_size,
        layer_digests=tuple(d["digest"] for d in layer_descs),
        layer_sizes=tuple(d["size"] for d in layer_descs),
        layer_media_types=tuple(d["mediaType"] for d in layer_descs),
        platform=_platform_str(_platform_dict(platform)),
    )


def write_oci_image(
    layout_dir: Path,
    tag: str,
    layers: Sequence[bytes],
    *,
    os: str = "linux",
    arch: str = "amd64",
    variant: str | None = None,
    config_extra: Mapping[str, Any] | None = None,
    compress: bool = True,
) -> ImageRef:
    """Write a single-platform image with one layer per item of ``layers`` (each layer a
    tar holding one file with those bytes) and tag it ``tag`` in the layout.

    ``config_extra`` is merged into the top level of the image config (e.g. ``{"config":
    {"Labels": {...}}}`` replaces ``config``). ``compress=False`` writes plain tar layers.
    """
    _init_layout(layout_dir)
    platform: Platform = (os, arch, variant) if variant else (os, arch)
    ref = _write_image_blobs(layout_dir, layers, platform, config_extra=config_extra, compress=compress)
    _tag_in_layout(
        layout_dir,
        tag,
        {
            "mediaType": OCI_MANIFEST,
            "digest": ref.manifest_digest,
            "size": ref.manifest_size,
        },
    )
    return ref


def write_oci_index(
    layout_dir: Path,
    tag: str,
    platforms: Sequence[Platform],
    layers_per_platform: Sequence[Sequence[bytes]] | None = None,
    *,
    config_extra: Mapping[str, Any] | None = None,
    compress: bool = True,
    seed: int = 0,
) -> ImageRef:
    """Write a multi-platform OCI image index tagged ``tag``.

    ``layers_per_platform[i]`` are the layer contents of ``platforms[i]``'s image; by
    default each platform gets one small layer unique to it (and to ``seed``).
    """
    if layers_per_platform is None:
        layers_per_platform = [[f"moorage test layer for {'/'.join(p)} (seed {seed})\n".encode()] for p in platforms]
    if len(layers_per_platform) != len(platforms):
        raise ValueError("layers_per_platform must have one entry per platform")
    _init_layout(layout_dir)
    children: list[ImageRef] = []
    descs: list[dict[str, Any]] = []
    for platform, layers in zip(platforms, layers_per_platform, strict=True):
        child = _write_image_blobs(layout_dir, layers, platform, config_extra=config_extra, compress=compress)
        children.append(child)
        descs.append(
            {
                "mediaType": OCI_MANIFEST,
                "digest": child.manifest_digest,
                "size": child.manifest_size,
                "platform": _platform_dict(platform),
            }
        )
    raw = _canonical_json({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": descs})
    digest, size = _write_blob(layout_dir, raw)
    _tag_in_layout(layout_dir, tag, {"mediaType": OCI_INDEX, "digest": digest, "size": size})
    return ImageRef(
        manifest_digest=digest,
        media_type=OCI_INDEX,
        manifest_size=size,
        raw_manifest=raw,
        child_manifest_digests=tuple(c.manifest_digest for c in children),
        children=tuple(children),
    )


# -- registry side -------------------------------------------------------------------


def _registry_url(registry: str) -> str:
    return registry if registry.startswith("http") else f"http://{registry}"


def _run(argv: Sequence[str], timeout: float) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        list(argv),
        check=False,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )
    if proc.returncode != 0:
        raise RuntimeError(
            f"command failed ({proc.returncode}): {' '.join(argv)}\n"
            f"--- stdout ---\n{proc.stdout}\n--- stderr ---\n{proc.stderr}"
        )
    return proc


def push(
    layout_dir: Path,
    tag: str,
    registry_host: str,
    repo: str,
    dest_tag: str,
    *,
    docker_v2s2: bool = False,
    all_platforms: bool = False,
    preserve_digests: bool = False,
    timeout: float = 300.0,
) -> ImageRef:
    """Copy ``oci:LAYOUT:TAG`` to ``docker://HOST/REPO:DEST_TAG`` with skopeo.

    ``docker_v2s2`` converts to Docker schema 2 (manifest list for an index);
    ``all_platforms`` (``--all``) is needed to push an index with all its images;
    without it skopeo pushes only the image for the host's platform. skopeo gzips plain
    tar layers on the way unless ``preserve_digests`` (``--preserve-digests``, which
    refuses any change of digest, so not with ``docker_v2s2``).
    Returns the image as the registry holds it afterwards (digests may differ from the
    layout's after a format conversion).
    """
    skopeo = require_tool("skopeo")
    argv = [skopeo, "--insecure-policy", "copy", "--quiet", "--dest-tls-verify=false"]
    if all_platforms:
        argv.append("--all")
    if docker_v2s2:
        argv += ["--format", "v2s2"]
    if preserve_digests:
        argv.append("--preserve-digests")
    argv += [f"oci:{layout_dir}:{tag}", f"docker://{registry_host}/{repo}:{dest_tag}"]
    _run(argv, timeout)
    return inspect_image(_registry_url(registry_host), repo, dest_tag)


def get_manifest(registry_url: str, repo: str, reference: str) -> tuple[bytes, str, str]:
    """``GET /v2/<repo>/manifests/<reference>`` accepting all current manifest types.

    Returns ``(raw, media_type, digest)``; the digest is the sha256 of the raw bytes and
    is checked against ``Docker-Content-Digest``.
    """
    resp = request(
        "GET",
        f"{_registry_url(registry_url)}/v2/{repo}/manifests/{reference}",
        headers={"Accept": MANIFEST_ACCEPT},
    )
    if resp.status != 200:
        raise RuntimeError(f"GET manifest {repo}:{reference} -> {resp.status}: {resp.body[:500]!r}")
    digest = sha256_digest(resp.body)
    header = resp.header("docker-content-digest")
    if header and header != digest:
        raise RuntimeError(f"Docker-Content-Digest {header} != sha256 of body {digest}")
    media_type = resp.header("content-type").split(";")[0].strip()
    body_type = json.loads(resp.body).get("mediaType")
    return resp.body, body_type or media_type, digest


def inspect_image(registry_url: str, repo: str, reference: str) -> ImageRef:
    """Walk a manifest (and, for an index, its children) through the registry API."""
    raw, media_type, digest = get_manifest(registry_url, repo, reference)
    doc = json.loads(raw)
    if media_type in INDEX_TYPES:
        children = []
        for desc in doc.get("manifests", []):
            child = inspect_image(registry_url, repo, desc["digest"])
            platform = _platform_str(desc["platform"]) if "platform" in desc else None
            children.append(replace(child, platform=platform))
        return ImageRef(
            manifest_digest=digest,
            media_type=media_type,
            manifest_size=len(raw),
            raw_manifest=raw,
            child_manifest_digests=tuple(c.manifest_digest for c in children),
            children=tuple(children),
        )
    if doc.get("schemaVersion") != 2 or "config" not in doc:
        raise RuntimeError(f"unsupported manifest for {repo}:{reference}: {media_type}")
    layers = doc.get("layers", [])
    platform = None
    config_resp = request(
        "GET",
        f"{_registry_url(registry_url)}/v2/{repo}/blobs/{doc['config']['digest']}",
    )
    if config_resp.status == 200:
        try:
            platform = _platform_str(json.loads(config_resp.body))
        except (ValueError, AttributeError):
            platform = None
    return ImageRef(
        manifest_digest=digest,
        media_type=media_type,
        manifest_size=len(raw),
        raw_manifest=raw,
        config_digest=doc["config"]["digest"],
        config_size=int(doc["config"]["size"]),
        layer_digests=tuple(x["digest"] for x in layers),
        layer_sizes=tuple(int(x["size"]) for x in layers),
        layer_media_types=tuple(x.get("mediaType", "") for x in layers),
        platform=platform,
    )


def _hash_stream(stream: BinaryIO) -> tuple[str, int]:
    h = hashlib.sha256()
    size = 0
    while chunk := stream.read(_CHUNK):
        h.update(chunk)
        size += len(chunk)
    return "sha256:" + h.hexdigest(), size


def push_blob(
    registry_url: str,
    repo: str,
    source: Path | bytes | BinaryIO,
    digest: str | None = None,
    *,
    timeout: float = 600.0,
) -> str:
    """Upload one blob monolithically (``POST .../blobs/uploads/`` then ``PUT ?digest=``).

    ``source`` is a file path, bytes, or a seekable binary file object; files are
    streamed in 1 MiB blocks, never read into memory whole. ``digest`` is computed (one
    extra read of the source) when not given. Returns the digest.
    """
    base = _registry_url(registry_url)
    opened: BinaryIO | None = None
    try:
        if isinstance(source, bytes):
            body: bytes | BinaryIO = source
            size = len(source)
            digest = digest or sha256_digest(source)
        else:
            if isinstance(source, Path):
                opened = source.open("rb")
                stream: BinaryIO = opened
            else:
                stream = source
            start = stream.tell()
            if digest is None:
                digest, size = _hash_stream(stream)
            else:
                size = stream.seek(0, os.SEEK_END) - start
            stream.seek(start)
            body = stream
        resp = request("POST", f"{base}/v2/{repo}/blobs/uploads/", timeout=timeout)
        if resp.status != 202:
            raise RuntimeError(f"starting upload to {repo}: {resp.status} {resp.body[:500]!r}")
        location = resp.header("location")
        if not location.startswith("http"):
            location = base + location
        sep = "&" if "?" in location else "?"
        resp = request(
            "PUT",
            f"{location}{sep}digest={digest}",
            headers={
                "Content-Type": "application/octet-stream",
                "Content-Length": str(size),
            },
            body=body,
            timeout=timeout,
        )
        if resp.status != 201:
            raise RuntimeError(f"finishing upload to {repo}: {resp.status} {resp.body[:500]!r}")
        return digest
    finally:
        if opened is not None:
            opened.close()


def push_manifest(registry_url: str, repo: str, reference: str, manifest: bytes, media_type: str) -> str:
    """``PUT /v2/<repo>/manifests/<reference>``; returns the manifest's digest."""
    resp = request(
        "PUT",
        f"{_registry_url(registry_url)}/v2/{repo}/manifests/{reference}",
        headers={"Content-Type": media_type},
        body=manifest,
    )
    if resp.status != 201:
        raise RuntimeError(f"PUT manifest {repo}:{reference}: {resp.status} {resp.body[:500]!r}")
    return sha256_digest(manifest)


def write_random_file(path: Path, size: int, seed: int) -> str:
    """Write ``size`` deterministic incompressible bytes to ``path`` in 8 MiB chunks and
    return their sha256 digest (for blobs too large to build in memory)."""
    rng = random.Random(seed)
    h = hashlib.sha256()
    remaining = size
    with path.open("wb") as fh:
        while remaining > 0:
            chunk = rng.randbytes(min(_CHUNK, remaining))
            fh.write(chunk)
            h.update(chunk)
            remaining -= len(chunk)
    return "sha256:" + h.hexdigest()
