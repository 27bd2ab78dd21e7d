"""What an upstream's TLS certificate is checked against.

The public CAs (certifi's bundle, as httpx's own default), the system's store (where
``update-ca-certificates`` puts a company's CA; ``SSL_CERT_FILE`` and ``SSL_CERT_DIR`` stand in
for it, as for OpenSSL), and the upstream's own ``ca_file`` (a private registry's CA). httpx's
default trusted certifi's bundle alone, or ``SSL_CERT_FILE`` in its place: a private CA could
not be added without losing the public ones.
"""

from __future__ import annotations

import ssl

import certifi

from moorage.config import ConfigError, UpstreamSettings

__all__ = ["trust_for"]


def trust_for(index: int | None, settings: UpstreamSettings) -> ssl.SSLContext:
    """The TLS context for ``upstreams[index]`` (None: an upstream not from a settings file's
    list); blocks (it reads the CA files). A ``ca_file`` that cannot be loaded is a
    configuration error naming it."""
    context = ssl.create_default_context(cafile=certifi.where())
    context.load_default_certs()
    if settings.ca_file is not None:
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
