"""What an upstream's TLS certificate is checked against.

The public CAs (certifi's bundle, as httpx's own default), the system's store (where
``update-ca-certificates`` puts a company's CA; ``SSL_CERT_FILE`` and ``SSL_CERT_DIR`` stand in
for it, as for OpenSSL), and the upstream's own ``ca_file`` (a private registry's CA). httpx's
default trusted certifi's bundle alone, or ``SSL_CERT_FILE`` in its place: a private CA could
not be added without losing the public ones.
"""

from __future__ import annotations

import functools
import os
import ssl

import certifi

from moorage.config import ConfigError, UpstreamSettings

__all__ = ["trust_for"]


def trust_for(index: int | None, settings: UpstreamSettings) -> ssl.SSLContext:
    """The TLS context for ``upstreams[index]`` (None: an upstream not from a settings file's
    list); blocks (it reads the CA files). A ``ca_file`` that cannot be loaded is a
    configuration error naming it. Upstreams with no ``ca_file`` share one context: each
    costs some 60 ms to load."""
    if settings.ca_file is None:
        return _shared(os.environ.get("SSL_CERT_FILE"), os.environ.get("SSL_CERT_DIR"))
    context = _public_and_system()
    try:
        context.load_verify_locations(cafile=settings.ca_file)
    except (OSError, ssl.SSLError, ValueError) as exc:
        reason = "no PEM certificate in it"
        # ssl.SSLError is an OSError too: its text is OpenSSL's, the file holds no certificate.
        if isinstance(exc, OSError) and not isinstance(exc, ssl.SSLError) and exc.strerror:
            reason = exc.strerror
        key = f"upstreams[{index}].ca_file" if index is not None else f"ca_file of {settings.host}"
        raise ConfigError(None, [f"{key}: cannot load {settings.ca_file}: {reason}"]) from None
    return context


@functools.cache
def _shared(cert_file: str | None, cert_dir: str | None) -> ssl.SSLContext:
    """One context for every upstream without a CA of its own, per value of the variables
    OpenSSL reads for the system's store."""
    return _public_and_system()


def _public_and_system() -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=certifi.where())
    context.load_default_certs()
    return context
