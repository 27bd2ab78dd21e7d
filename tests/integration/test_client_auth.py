"""Client authentication with real clients: skopeo with --src-creds, podman after podman login
to the mirror host; without credentials both are refused."""

from __future__ import annotations

import subprocess
from pathlib import Path

import bcrypt
import pytest

from .harness import images
from .harness.clients import ClientError, Podman, skopeo_copy
from .harness.moorage import MoorageProcess
from .harness.registry import RealRegistry

pytestmark = pytest.mark.integration
PASSWORD = "s3cret-for-ci"


def test_skopeo_and_podman_pull_with_credentials_and_not_without(tmp_path: Path) -> None:
    htpasswd = tmp_path / "htpasswd"
    htpasswd.write_text(f"ci:{bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(5)).decode()}\n")
    with RealRegistry(tmp_path / "registry") as registry:
        layout = tmp_path / "layout"
        images.write_oci_image(layout, "app", [images.random_layer(64 * 1024, 51)])
        images.push(layout, "app", registry.host, "library/app", "1")
        upstreams = [{"host": "docker.io", "url": registry.url, "default": True}]
        with MoorageProcess(tmp_path / "m", upstreams, auth={"htpasswd_file": str(htpasswd)}) as moorage:
            with pytest.raises(ClientError, match=r"authentication|unauthorized|401"):
                skopeo_copy(f"docker://{moorage.host}/app:1", f"dir:{tmp_path / 'denied'}")
            skopeo_copy(
                f"docker://{moorage.host}/app:1", f"dir:{tmp_path / 'ok'}", extra=["--src-creds", f"ci:{PASSWORD}"]
            )
            with Podman(tmp_path / "podman", moorage.host) as podman:
                refused = podman.run("pull", "docker.io/library/app:1", check=False, timeout=120)
                assert refused.returncode != 0
                podman.login(moorage.host, "ci", PASSWORD)
                podman.pull("docker.io/library/app:1")
                assert podman.image_exists("docker.io/library/app:1")
            users = {line.get("user") for line in moorage.log_lines() if line.get("event") == "pull"}
            assert users == {"ci"}
            assert PASSWORD not in moorage.log_path.read_text()
            grep = subprocess.run(["grep", "-r", PASSWORD, str(moorage.store)], capture_output=True, check=False)
            assert grep.returncode == 1, "the password is in no stored file"
