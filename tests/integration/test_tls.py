"""HTTPS on Moorage's own listener: real clients verify it with a CA the test makes, the
certificate is reloaded on SIGHUP without a restart, client certificates can be required,
and a broken certificate is a clear configuration error."""

from __future__ import annotations

import random
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from .harness import images
from .harness.clients import Containerd, Podman
from .harness.moorage import MoorageProcess
from .harness.registry import RealRegistry
from .harness.tools import require_tool, self_signed_certificate

pytestmark = pytest.mark.integration


def openssl(*args: str) -> None:
    subprocess.run([require_tool("openssl"), *args], check=True, capture_output=True)


def make_ca(directory: Path) -> tuple[Path, Path]:
    """A CA certificate and key, (cert, key)."""
    return self_signed_certificate(directory, "Moorage test CA")


def issue(ca: tuple[Path, Path], directory: Path, name: str, *, client: bool = False) -> tuple[Path, Path]:
    key, csr, cert, ext = (directory / f"{name}.{s}" for s in ("key", "csr", "crt", "ext"))
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(csr), "-subj", f"/CN={name}")
    ext.write_text("extendedKeyUsage=clientAuth\n" if client else "subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    openssl(
        "x509",
        "-req",
        "-in",
        str(csr),
        "-CA",
        str(ca[0]),
        "-CAkey",
        str(ca[1]),
        "-CAcreateserial",
        "-out",
        str(cert),
        "-days",
        "2",
        "-extfile",
        str(ext),
    )
    return cert, key


def served_certificate(port: int, cafile: Path) -> bytes:
    context = ssl.create_default_context(cafile=str(cafile))
    with (
        socket.create_connection(("127.0.0.1", port)) as raw,
        context.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
    ):
        certificate = tls.getpeercert(binary_form=True)
    assert certificate is not None
    return certificate


@pytest.fixture
def upstream(tmp_path: Path) -> RealRegistry:
    registry = RealRegistry(tmp_path / "registry")
    layout = tmp_path / "layout"
    images.write_oci_image(layout, "app", [images.random_layer(128 * 1024, 41)])
    images.push(layout, "app", registry.host, "library/app", "1")
    return registry


def test_clients_pull_over_verified_tls_and_the_certificate_reloads(upstream: RealRegistry, tmp_path: Path) -> None:
    ca = make_ca(tmp_path / "pki")
    cert, key = issue(ca, tmp_path / "pki", "server")
    certs_dir = tmp_path / "certs.d"
    certs_dir.mkdir()
    (certs_dir / "ca.crt").write_bytes(ca[0].read_bytes())
    upstreams = [{"host": "docker.io", "url": upstream.url, "default": True}]
    with MoorageProcess(tmp_path / "m", upstreams, tls={"cert_file": str(cert), "key_file": str(key)}) as moorage:
        pulled = skopeo(moorage.host, tmp_path / "out", "--src-cert-dir", str(certs_dir))
        assert pulled.returncode == 0, pulled.stderr  # cold: blobs copied through Python, not sendfile
        warm = skopeo(moorage.host, tmp_path / "out-warm", "--src-cert-dir", str(certs_dir))
        assert warm.returncode == 0, warm.stderr
        refused = skopeo(moorage.host, tmp_path / "out2")  # verification on, the test CA unknown
        assert refused.returncode != 0 and "certificate" in refused.stderr
        with Podman(tmp_path / "podman", moorage.host, tls_verify=True) as podman:
            untrusted = podman.pull("docker.io/library/app:1", check=False, timeout=120)
            assert untrusted.returncode != 0, "podman verifies the mirror's certificate"
            podman.pull("docker.io/library/app:1", extra=["--cert-dir", str(certs_dir)])
            assert podman.image_exists("docker.io/library/app:1")
        with Containerd(tmp_path / "containerd") as containerd:  # trusting the CA as client-config sets it
            generated = subprocess.run(
                [
                    *(sys.executable, "-m", "moorage.proxy", "client-config", "containerd"),
                    *("--config", str(moorage.config_path), "--url", f"https://{moorage.host}"),
                    *("--ca", str(ca[0]), "--output-dir", str(containerd.hosts_dir)),
                ],
                capture_output=True,
                text=True,
                check=False,
            )
            assert generated.returncode == 0, generated.stderr
            served = len([line for line in moorage.log_lines() if line.get("event") == "request"])
            containerd.pull("docker.io/library/app:1")
            # Not through its fallback server (the upstream itself): the cache answered.
            assert len([line for line in moorage.log_lines() if line.get("event") == "request"]) > served
        before = served_certificate(moorage.port, ca[0])
        issue(ca, tmp_path / "pki", "server")  # a new certificate in the same files
        moorage.signal_hup()
        after = served_certificate(moorage.port, ca[0])
        assert after != before, "SIGHUP loads the new certificate without a restart"
        # A renewal tool that has written the certificate but not yet its key: the reload
        # fails, and the certificate in use stays (handshakes keep working).
        (tmp_path / "pki2").mkdir()
        new_cert, _ = issue(ca, tmp_path / "pki2", "server")
        cert.write_bytes(new_cert.read_bytes())
        moorage.signal_hup()
        assert served_certificate(moorage.port, ca[0]) == after
        assert any(line.get("event") == "tls_reload_failed" for line in moorage.log_lines())
        healthy = subprocess.run(
            [sys.executable, "-m", "moorage.proxy", "healthcheck", "--config", str(moorage.config_path)],
            check=False,
        )
        assert healthy.returncode == 0


def skopeo(host: str, out: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    """skopeo with TLS verification on (the default), unlike the harness's helper."""
    argv = [require_tool("skopeo"), "--insecure-policy", "copy", *extra, f"docker://{host}/app:1", f"dir:{out}"]
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)


def test_client_certificates_can_be_required(upstream: RealRegistry, tmp_path: Path) -> None:
    ca = make_ca(tmp_path / "pki")
    cert, key = issue(ca, tmp_path / "pki", "server")
    client_cert, client_key = issue(ca, tmp_path / "pki", "ci-runner", client=True)
    tls = {"cert_file": str(cert), "key_file": str(key), "client_ca_file": str(ca[0])}
    upstreams = [{"host": "docker.io", "url": upstream.url, "default": True}]
    with MoorageProcess(tmp_path / "m", upstreams, tls=tls, client_cert=(client_cert, client_key)) as moorage:
        url = f"https://127.0.0.1:{moorage.port}/v2/app/manifests/1"
        without = subprocess.run(["curl", "-sf", "--cacert", str(ca[0]), url], capture_output=True, check=False)
        assert without.returncode != 0
        with_cert = subprocess.run(
            ["curl", "-sf", "--cacert", str(ca[0]), "--cert", str(client_cert), "--key", str(client_key), url],
            capture_output=True,
            check=False,
        )
        assert with_cert.returncode == 0, with_cert.stderr
        # The probes have no certificate: /healthz and /readyz answer them, nothing else does.
        no_certificate = client_context(ca[0], None)
        refused = https_get(moorage.port, "/v2/", no_certificate)
        assert refused[0] == 401 and b"UNAUTHORIZED" in refused[1]
        assert https_get(moorage.port, "/healthz", no_certificate)[0] == 200
        assert https_get(moorage.port, "/readyz", no_certificate)[0] == 200
        checked = subprocess.run(
            [sys.executable, "-m", "moorage.proxy", "healthcheck", "--config", str(moorage.config_path)],
            capture_output=True,
            text=True,
            check=False,
        )
        assert checked.returncode == 0, checked.stderr


def client_context(cafile: Path, client: tuple[Path, Path] | None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(cafile))
    context.check_hostname = False
    if client is not None:
        context.load_cert_chain(*client)
    return context


def https_get(
    port: int, path: str, context: ssl.SSLContext, session: ssl.SSLSession | None = None
) -> tuple[int, bytes, ssl.SSLSession | None, bool]:
    """(status, body, the TLS session to resume with, whether this one was resumed)."""
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    with context.wrap_socket(raw, server_hostname="localhost", session=session) as tls:
        tls.sendall(f"GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n".encode())
        answer = b""
        while chunk := tls.recv(65536):
            answer += chunk
        if not answer:  # TLS 1.3 refuses a client certificate after the client's handshake ends
            raise ConnectionError("closed without an answer")
        head, _, body = answer.partition(b"\r\n\r\n")
        return int(head.split()[1]), body, tls.session, bool(tls.session_reused)


def test_a_client_ca_replaced_ends_the_sessions_it_let_in(upstream: RealRegistry, tmp_path: Path) -> None:
    """A client cut off by a new client CA could resume its old TLS session (a TLS 1.3
    ticket) and be let in for the ticket's lifetime, hours, with no certificate checked."""
    old_ca, new_ca = make_ca(tmp_path / "old"), make_ca(tmp_path / "new")
    cert, key = issue(old_ca, tmp_path / "old", "server")
    client = issue(old_ca, tmp_path / "old", "ci-runner", client=True)
    client_ca = tmp_path / "client-ca.pem"
    client_ca.write_bytes(old_ca[0].read_bytes())
    tls = {"cert_file": str(cert), "key_file": str(key), "client_ca_file": str(client_ca)}
    upstreams = [{"host": "docker.io", "url": upstream.url, "default": True}]
    with MoorageProcess(tmp_path / "m", upstreams, tls=tls, client_cert=client) as moorage:
        context = client_context(old_ca[0], client)
        status, _, session, _ = https_get(moorage.port, "/v2/", context)
        assert status == 200 and session is not None
        assert https_get(moorage.port, "/v2/", context, session)[3], "resumed while the CA stands"
        client_ca.write_bytes(new_ca[0].read_bytes())
        moorage.signal_hup()
        try:
            status, _, _, resumed = https_get(moorage.port, "/v2/", context, session)
        except (ssl.SSLError, ConnectionError):
            # Refused in the handshake, as it should be; or a server that died, which is not.
            assert moorage.running(), "the server died"
            assert https_get(moorage.port, "/healthz", client_context(old_ca[0], None))[0] == 200
            return
        assert not resumed and status == 401, (status, resumed)


def test_blob_bodies_and_ranges_over_tls_are_exact_cold_and_warm(tmp_path: Path) -> None:
    """TLS rules out sendfile, so blobs take a path of their own, stored ones read 512 KiB at a
    time: every byte, at chunk edges too, whether the blob is filling or stored."""
    registry = RealRegistry(tmp_path / "registry")
    body = random.Random(7).randbytes(3 * 1024 * 1024 + 4321)  # chunks of 1 MiB and a short tail
    digest = images.push_blob(registry.url, "library/big", body)
    ca = make_ca(tmp_path / "pki")
    cert, key = issue(ca, tmp_path / "pki", "server")
    upstreams = [{"host": "docker.io", "url": registry.url, "default": True}]
    with MoorageProcess(tmp_path / "m", upstreams, tls={"cert_file": str(cert), "key_file": str(key)}) as moorage:
        context = ssl.create_default_context(cafile=str(ca[0]))
        url = f"{moorage.url}/v2/big/blobs/{digest}"

        def get(range_header: str | None = None) -> tuple[int, dict[str, str], bytes]:
            request = urllib.request.Request(url, headers={"Range": range_header} if range_header else {})
            try:
                with urllib.request.urlopen(request, context=context, timeout=30) as answer:
                    return answer.status, dict(answer.headers), answer.read()
            except urllib.error.HTTPError as refused:
                return refused.code, dict(refused.headers), refused.read()

        status, headers, cold = get()
        assert (status, headers["X-Moorage-Cache"], cold) == (200, "miss", body)
        deadline = time.monotonic() + 20
        while (answer := get())[1]["X-Moorage-Cache"] != "hit" and time.monotonic() < deadline:
            time.sleep(0.05)  # until stored: then it is read from the file
        status, headers, warm = answer
        assert (status, headers["X-Moorage-Cache"], warm) == (200, "hit", body)
        assert headers["Content-Length"] == str(len(body))
        # The validator is the digest on this path too, with no date (the file's mtime moves).
        assert headers["ETag"] == f'"{digest}"' and "Last-Modified" not in headers
        start, end = 1024 * 1024 - 3, 2 * 1024 * 1024 + 5  # across two chunk edges
        status, headers, part = get(f"bytes={start}-{end}")
        assert (status, part) == (206, body[start : end + 1])
        assert headers["Content-Range"] == f"bytes {start}-{end}/{len(body)}"
        assert get("bytes=-10")[::2] == (206, body[-10:])
        status, headers, _ = get(f"bytes={len(body)}-")
        assert (status, headers["Content-Range"]) == (416, f"bytes */{len(body)}")
    registry.stop()


def test_a_broken_certificate_is_a_configuration_error(tmp_path: Path) -> None:
    bogus = tmp_path / "bogus.pem"
    bogus.write_text("not a certificate")
    config = tmp_path / "config.yaml"
    config.write_text(
        f"listen: 127.0.0.1:0\nstorage: {{path: {tmp_path}/s}}\ntls: {{cert_file: {bogus}, key_file: {bogus}}}\n"
    )
    result = subprocess.run(
        [sys.executable, "-m", "moorage.proxy", "serve", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 2
    assert "tls.cert_file" in result.stderr and "Traceback" not in result.stderr


def test_each_certificate_file_mistake_names_its_file(tmp_path: Path) -> None:
    """A missing key was reported against the certificate, and an encrypted one made OpenSSL
    ask for a passphrase on the terminal, where start-up waited."""
    cert, key = self_signed_certificate(tmp_path, "localhost")
    encrypted = tmp_path / "encrypted.key"
    openssl("pkey", "-in", str(key), "-out", str(encrypted), "-aes256", "-passout", "pass:secret")

    def check(key_file: Path) -> str:
        config = tmp_path / "config.yaml"
        config.write_text(f"storage: {{path: {tmp_path}/s}}\ntls: {{cert_file: {cert}, key_file: {key_file}}}\n")
        result = subprocess.run(
            [sys.executable, "-m", "moorage.proxy", "check-config", str(config)],
            capture_output=True,
            text=True,
            timeout=30,
            stdin=subprocess.DEVNULL,
            check=False,
        )
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
        return result.stderr

    missing = check(tmp_path / "gone.key")
    assert f"tls.key_file: cannot read {tmp_path / 'gone.key'}" in missing and str(cert) not in missing
    assert f"tls.key_file: {encrypted} is encrypted" in check(encrypted)
