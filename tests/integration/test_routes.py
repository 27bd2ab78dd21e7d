"""Content by digest through another repository, against a real registry (Distribution keeps
blobs per repository, as Docker Hub does): a client the access policy confines to
``docker.io/library/*`` pulls an image sharing a layer with a private one the cache holds, and
gets it; asking for the private image's own layer through its allowed repository gets 404."""

from __future__ import annotations

import base64
import json
import urllib.error
import urllib.request
from pathlib import Path

import bcrypt
import pytest

from .harness import images
from .harness.clients import skopeo_copy
from .harness.moorage import MoorageProcess
from .harness.registry import RealRegistry

pytestmark = pytest.mark.integration
PASSWORD = "routes-test-passphrase"
POLICY = [
    {"effect": "allow", "users": ["admin"], "repositories": ["*"]},
    {"effect": "allow", "users": ["ci"], "repositories": ["docker.io/library/*"]},
    {"effect": "deny", "description": "nobody else", "repositories": ["*"]},
]


def get(url: str, user: str, method: str = "GET") -> tuple[int, bytes]:
    request = urllib.request.Request(url, method=method)
    request.add_unredirected_header("Authorization", "Basic " + _basic(user))
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def _basic(user: str) -> str:
    return base64.b64encode(f"{user}:{PASSWORD}".encode()).decode()


def test_a_confined_client_gets_shared_layers_but_not_private_ones(tmp_path: Path) -> None:
    htpasswd = tmp_path / "htpasswd"
    hashed = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(5)).decode()
    htpasswd.write_text(f"admin:{hashed}\nci:{hashed}\n")
    base = images.random_layer(128 * 1024, 61)
    with RealRegistry(tmp_path / "registry") as registry:
        layout = tmp_path / "layout"
        images.write_oci_image(layout, "secret", [base, images.random_layer(96 * 1024, 62)])
        images.write_oci_image(layout, "app", [base])
        secret = images.push(layout, "secret", registry.host, "team/secret", "1")
        app = images.push(layout, "app", registry.host, "library/app", "1")
        shared, private_layer = secret.layer_digests
        assert app.layer_digests == (shared,)
        upstreams = [{"host": "docker.io", "url": registry.url, "default": True}]
        auth = {"htpasswd_file": str(htpasswd), "policy": POLICY}
        with MoorageProcess(tmp_path / "m", upstreams, auth=auth) as moorage:
            skopeo_copy(
                f"docker://{moorage.host}/team/secret:1",
                f"dir:{tmp_path / 'admin'}",
                extra=["--src-creds", f"admin:{PASSWORD}"],
            )
            mark = registry.mark()
            skopeo_copy(
                f"docker://{moorage.host}/library/app:1",
                f"dir:{tmp_path / 'ci'}",
                extra=["--src-creds", f"ci:{PASSWORD}"],
            )
            assert (tmp_path / "ci" / shared.split(":")[1]).read_bytes() == (
                tmp_path / "admin" / shared.split(":")[1]
            ).read_bytes()
            assert registry.count("GET", registry.blob_path("library/app", shared), mark) == 0, (
                "the shared layer came from the store"
            )
            assert registry.count("HEAD", registry.blob_path("library/app", shared), mark) == 1, (
                "one HEAD confirmed that library/app has it"
            )

            blob_url = f"{moorage.url}/v2/library/app/blobs/{private_layer}"
            for method in ("GET", "HEAD"):
                status, body = get(blob_url, "ci", method)
                assert status == 404, f"{method}: the private layer is not readable through library/app"
            status, body = get(blob_url, "ci")
            assert json.loads(body)["errors"][0]["code"] == "BLOB_UNKNOWN"
            status, _ = get(f"{moorage.url}/v2/library/app/manifests/{secret.manifest_digest}", "ci")
            assert status == 404
            status, _ = get(f"{moorage.url}/v2/team/secret/blobs/{private_layer}", "ci")
            assert status == 403
            status, body = get(blob_url, "admin")
            assert status == 200, "the admin may pull team/secret, so nothing is revealed to it"
            assert body == (tmp_path / "admin" / private_layer.split(":")[1]).read_bytes()
