"""``check-config`` reads every file the settings name, as ``serve`` does, and both name the
settings file in what they report: a config that passes the check does not fail at start."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import bcrypt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from moorage.cache import open_cache
from moorage.config import ConfigError, StorageSettings
from tests.immutable import immutable
from tests.integration.harness.tools import self_signed_certificate


def moorage(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "moorage.proxy", *args], capture_output=True, text=True, check=False, timeout=timeout
    )


def write_config(directory: Path, **files: Path) -> Path:
    """A settings file naming ``files``: cert, key, htpasswd, groups, signing_key, password, ca, store."""
    config = directory / "config.yaml"
    config.write_text(
        f"""listen: 127.0.0.1:0
storage: {{path: "{files["store"]}"}}
tls: {{cert_file: "{files["cert"]}", key_file: "{files["key"]}"}}
auth:
  htpasswd_file: "{files["htpasswd"]}"
  groups_file: "{files["groups"]}"
  token_signing_key_file: "{files["signing_key"]}"
upstreams:
  - {{host: a.io, url: "https://a.io", default: true, username: robot, password_file: "{files["password"]}",
     ca_file: "{files["ca"]}"}}
"""
    )
    return config


def good_files(directory: Path) -> dict[str, Path]:
    cert, key = self_signed_certificate(directory / "tls")
    htpasswd = directory / "htpasswd"
    htpasswd.write_text(f"ci:{bcrypt.hashpw(b'secret', bcrypt.gensalt(4)).decode()}\n")
    groups = directory / "groups"
    groups.write_text("robots: ci\n")
    signing_key = directory / "token-key.pem"
    signing_key.write_bytes(
        ec.generate_private_key(ec.SECP256R1()).private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    password = directory / "password"
    password.write_text("hunter2\n")
    return {
        "cert": cert,
        "ca": cert,  # self-signed: its own CA
        "key": key,
        "htpasswd": htpasswd,
        "groups": groups,
        "signing_key": signing_key,
        "password": password,
        "store": directory / "store",
    }


def test_a_config_whose_files_serve_would_read_passes(tmp_path: Path) -> None:
    config = write_config(tmp_path, **good_files(tmp_path))
    checked = moorage("check-config", str(config))
    assert checked.returncode == 0, checked.stderr
    assert "files read" in checked.stdout and "(1 upstream, store in" in checked.stdout
    assert not (tmp_path / "store").exists(), "the check creates nothing"


def test_check_config_reports_every_file_serve_would_refuse(tmp_path: Path) -> None:
    files = good_files(tmp_path)
    files["htpasswd"].write_text("ci:plaintext\n")  # not a bcrypt hash
    files["signing_key"].write_text("not a key\n")
    files["store"].write_text("a file where the store should be\n")
    broken = {
        **files,
        "cert": tmp_path / "absent.crt",
        "password": tmp_path / "absent-password",
        "ca": files["groups"],  # no certificate in it
    }
    config = write_config(tmp_path, **broken)
    checked = moorage("check-config", str(config))
    assert checked.returncode == 2, checked.stdout
    assert "Traceback" not in checked.stderr
    assert f"invalid configuration in {config}" in checked.stderr
    for problem in (
        f"tls.cert_file: cannot read {tmp_path / 'absent.crt'}",
        "auth.htpasswd_file:",
        "auth.token_signing_key_file:",
        "upstreams[0].password_file: cannot read",
        "upstreams[0].ca_file: cannot load",
        f"storage.path: {files['store']} is not a directory",
    ):
        assert problem in checked.stderr, checked.stderr
    # Away from the machine that serves it, the settings alone can be checked.
    assert moorage("check-config", "--skip-files", str(config)).returncode == 0
    # serve refuses the same config, naming the file, before it listens.
    served = moorage("serve", "--config", str(config))
    assert served.returncode == 2
    assert f"invalid configuration in {config}" in served.stderr and "cannot listen" not in served.stderr
    assert "storage.path:" in served.stderr and "Traceback" not in served.stderr


def test_a_token_key_is_read_only_where_serving_reads_it(tmp_path: Path) -> None:
    """Without users no token is signed: a key file mounted only at run time (or not yet
    generated in the store) stops neither the check nor the start."""
    config = tmp_path / "config.yaml"
    config.write_text(
        f'listen: 127.0.0.1:0\nstorage: {{path: "{tmp_path / "store"}"}}\n'
        'auth: {token_signing_key_file: "/run/secrets/absent-token-key.pem"}\n'
    )
    checked = moorage("check-config", str(config))
    assert checked.returncode == 0, checked.stderr


def test_a_groups_file_is_read_even_when_the_rest_is_good(tmp_path: Path) -> None:
    files = good_files(tmp_path)
    files["groups"].write_text("no colon here\n")
    checked = moorage("check-config", str(write_config(tmp_path, **files)))
    assert checked.returncode == 2
    assert "auth.groups_file:" in checked.stderr and "line 1" in checked.stderr


async def test_a_store_that_cannot_be_opened_is_a_storage_path_error(tmp_path: Path) -> None:
    """Not blamed on the listen address, as an OSError at start once was."""
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ConfigError) as caught:
        async with open_cache(StorageSettings(path=blocker / "store")):
            pass
    assert caught.value.problems == [f"storage.path: cannot use {blocker / 'store'} as the store: Not a directory"]


def test_an_unset_password_variable_is_named_by_check_config_and_serve(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(
        f"""listen: 127.0.0.1:0
storage: {{path: "{tmp_path / "store"}"}}
upstreams:
  - {{host: a.io, url: "https://a.io", default: true, username: robot, password_env: MOORAGE_TEST_UNSET_TOKEN}}
"""
    )
    for command in ("check-config", "serve"):
        result = moorage(command, "--config", str(config)) if command == "serve" else moorage(command, str(config))
        assert result.returncode == 2, result.stdout
        assert "upstreams[0].password_env" in result.stderr and "MOORAGE_TEST_UNSET_TOKEN is not set" in result.stderr
        assert str(config) in result.stderr and "Traceback" not in result.stderr


def test_policy_rules_naming_unknown_users_groups_or_registries_are_warned_of(tmp_path: Path) -> None:
    """Valid (the files are reloaded while serving), but most likely a typo that refuses the
    pulls the rule was written for."""
    files = good_files(tmp_path)  # user ci, group robots
    config = write_config(tmp_path, **files)
    text = config.read_text().replace(
        "upstreams:",
        "  policy:\n"
        "    - {effect: allow, users: [ci, cii], repositories: ['a.io/*']}\n"
        "    - {effect: allow, groups: [robots, robotz], repositories: ['a.io/*', 'nvcr.io/*']}\n"
        "upstreams:",
    )
    config.write_text(text)
    checked = moorage("check-config", str(config))
    assert checked.returncode == 0, checked.stderr
    warnings = [line for line in checked.stderr.splitlines() if line.startswith("moorage: warning:")]
    assert warnings == [
        "moorage: warning: auth.policy[1].repositories: 'nvcr.io/*' names 'nvcr.io', which is no upstream here",
        f"moorage: warning: auth.policy[0].users: 'cii' is not in {files['htpasswd']}",
        f"moorage: warning: auth.policy[1].groups: 'robotz' has no member in {files['groups']}",
    ]


def test_settings_without_a_default_upstream_are_warned_of_docker_going_past_the_cache(tmp_path: Path) -> None:
    """A hand-written list without default: true serves prefixes and ns, but every request
    Docker's registry-mirrors sends would be a 404, after which dockerd pulls from Docker Hub."""
    config = tmp_path / "config.yaml"
    config.write_text(
        f'storage: {{path: "{tmp_path / "store"}"}}\nupstreams:\n  - {{host: docker.io, url: "https://registry-1.docker.io"}}\n'
    )
    checked = moorage("check-config", str(config))
    assert checked.returncode == 0
    assert "upstreams: none has default: true" in checked.stderr and "Docker pulls past the cache" in checked.stderr
    # serve logs it at start, where a container's log shows it (here before failing to listen).
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config.write_text(f'listen: "127.0.0.1:{port}"\n' + config.read_text())
        served = moorage("serve", "--config", str(config))
    assert served.returncode == 2 and "cannot listen" in served.stderr
    events = [json.loads(line) for line in served.stderr.splitlines() if line.startswith("{")]
    (warned,) = [event for event in events if event.get("event") == "no_default_upstream"]
    assert warned["level"] == "warning" and "Docker pulls past the cache" in warned["message"]
    config.write_text(config.read_text().replace('docker.io"}', 'docker.io", default: true}'))
    checked = moorage("check-config", str(config))
    assert checked.returncode == 0 and "default" not in checked.stderr, checked.stderr


def test_a_store_whose_index_serve_could_not_write_fails_the_check(tmp_path: Path) -> None:
    """A store made by root and served as another user: check-config said ok, and serve then
    failed on the index (a traceback, until the index's errors were named)."""
    store = tmp_path / "store"
    (store / "index").mkdir(parents=True)
    (store / "index" / "cache.db").write_bytes(b"")
    config = tmp_path / "config.yaml"
    config.write_text(f'storage: {{path: "{store}"}}\n')
    with immutable(store / "index" / "cache.db"):
        checked = moorage("check-config", str(config))
    assert checked.returncode == 2, checked.stdout
    assert f"storage.path: {store / 'index' / 'cache.db'} is not writable" in checked.stderr


def test_a_store_on_a_read_only_file_system_is_said_to_be_so(tmp_path: Path) -> None:
    """A store "not writable", and nothing more, sent an operator to chown a store on a volume mounted read-only."""
    if os.geteuid() != 0:
        pytest.fail("this test mounts a read-only tmpfs, which needs root (CI runs as root)")
    mountpoint = tmp_path / "disk"
    mountpoint.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(mountpoint)], check=True)
    try:
        config = tmp_path / "config.yaml"
        config.write_text(f'storage: {{path: "{mountpoint / "store"}"}}\n')
        checked = moorage("check-config", str(config))
    finally:
        subprocess.run(["umount", "-l", str(mountpoint)], check=False)
    assert checked.returncode == 2, checked.stdout
    assert f"{mountpoint} is not writable: its file system is mounted read-only" in checked.stderr


def test_check_config_away_from_the_server_passes_over_policy_files_not_there(tmp_path: Path) -> None:
    """The manual's check before a Helm upgrade: the rendered config.yaml alone, its lifecycle
    policies named where the pod mounts them."""
    config = tmp_path / "config.yaml"
    config.write_text(
        "upstreams:\n"
        "  - {host: docker.io, url: https://registry-1.docker.io, default: true,"
        " lifecycle_policy_file: /etc/moorage/settings/lifecycle-docker.io-all.json}\n"
    )
    served_here = moorage("check-config", str(config))
    assert served_here.returncode == 2 and "upstreams[0].lifecycle_policy_file" in served_here.stderr
    away = moorage("check-config", "--skip-files", str(config))
    assert away.returncode == 0, away.stderr
    assert "files not read" in away.stdout
    broken = tmp_path / "policy.json"
    broken.write_text('{"rules": "not a list"}')
    config.write_text(config.read_text().replace("/etc/moorage/settings/lifecycle-docker.io-all.json", str(broken)))
    checked = moorage("check-config", "--skip-files", str(config))
    assert checked.returncode == 2 and "upstreams[0].lifecycle_policy_file" in checked.stderr, "one there is read"


def test_check_config_away_from_the_server_still_warns_of_a_policy_for_no_upstream(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(
        "auth:\n  policy:\n    - {effect: allow, repositories: ['quay.io/*']}\n"
        "upstreams:\n  - {host: docker.io, url: https://registry-1.docker.io, default: true}\n"
    )
    checked = moorage("check-config", "--skip-files", str(config))
    assert checked.returncode == 0, checked.stderr
    assert "auth.policy[0].repositories: 'quay.io/*' names 'quay.io', which is no upstream here" in checked.stderr
