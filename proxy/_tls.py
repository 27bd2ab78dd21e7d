"""HTTPS for the listener: the server's SSL context, reloading its certificate, and the
client certificate that mutual TLS asks of every request but the probes'.

``reload`` builds a new context from the files and, only if it loads, makes it the one new
connections are wrapped by; connections already open keep going. It is called on SIGHUP and
when the files' modification times change (checked every 30 s). A file that cannot be read or
does not match is a configuration error naming the key at start; on a reload the old
certificate stays in use and the failure is logged. Sessions (TLS 1.3 tickets, TLS 1.2's
session cache) belong to the context that made them, so a client cut off by a new client CA
cannot resume its way back in.

With ``client_ca_file`` a client certificate is verified whenever one is sent; a request that
came without one is refused (401) unless it is for ``/healthz`` or ``/readyz``, which
``moorage healthcheck`` and Kubernetes' probes ask without a certificate.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from pathlib import Path
from typing import Final

from aiohttp import web
from aiohttp.typedefs import Handler

from moorage.config import NO_FILE, ConfigError, FileStamp, TlsSettings, file_stamp

from ._auth import Unauthorized

__all__ = ["ServerTls", "client_certificate_middleware"]

log = logging.getLogger("moorage")
CHECK_SECONDS: Final = 30.0


class ServerTls:
    """The listener's context, and the certificate it serves.

    A reload builds a whole new context and checks it before switching: the listener's
    context wraps every new connection with the current one (``_CurrentContext``), so a bad
    reload changes nothing and a good one never leaves a half-loaded certificate in use.
    """

    def __init__(self, settings: TlsSettings) -> None:
        self.settings = settings
        self._current = self._build()
        listener = _CurrentContext(ssl.PROTOCOL_TLS_SERVER)
        listener.server_tls = self
        self.context: ssl.SSLContext = listener
        self._stamp = self._mtimes()

    def _build(self) -> ssl.SSLContext:
        settings = self.settings
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        for key, path in (("tls.cert_file", settings.cert_file), ("tls.key_file", settings.key_file)):
            try:
                Path(path).open("rb").close()
            except OSError as exc:
                raise ConfigError(None, [f"{key}: cannot read {path}: {exc.strerror or exc}"]) from None
        try:
            # No passphrase prompt on the terminal: a start or a reload would wait on it.
            context.load_cert_chain(settings.cert_file, settings.key_file, password=_encrypted_key)
        except _EncryptedKey:
            raise ConfigError(
                None,
                [
                    f"tls.key_file: {settings.key_file} is encrypted; give the key without a passphrase"
                    " (openssl pkey -in encrypted.key -out plain.key)"
                ],
            ) from None
        except (OSError, ssl.SSLError) as exc:
            reason = getattr(exc, "reason", None) or exc
            raise ConfigError(
                None,
                [
                    f"tls.cert_file/tls.key_file: {settings.cert_file} and {settings.key_file} are not a PEM"
                    f" certificate (chain) and its private key ({reason})"
                ],
            ) from None
        if settings.client_ca_file is not None:
            try:
                context.load_verify_locations(settings.client_ca_file)
            except (OSError, ssl.SSLError) as exc:
                raise ConfigError(None, [f"tls.client_ca_file: cannot load {settings.client_ca_file}: {exc}"]) from None
            context.verify_mode = ssl.CERT_OPTIONAL  # a certificate sent is verified; none: see the middleware
        return context

    def _mtimes(self) -> tuple[FileStamp, ...]:
        stamps = []
        for name in (self.settings.cert_file, self.settings.key_file, self.settings.client_ca_file):
            try:
                stamps.append(file_stamp(Path(name)) if name is not None else NO_FILE)
            except OSError:
                stamps.append(NO_FILE)
        return tuple(stamps)

    def reload(self) -> None:
        """Build a context from the files; switch to it only if it loads (key matching cert)."""
        try:
            context = self._build()
        except ConfigError as error:
            log.error(
                "certificate not reloaded; the previous one stays in use",
                extra={"event": "tls_reload_failed", "error": "; ".join(error.problems)},
            )
            return
        self._current = context
        self._stamp = self._mtimes()
        log.info("certificate reloaded", extra={"event": "tls_reloaded", "cert_file": str(self.settings.cert_file)})

    async def watch(self) -> None:
        """Reload when the files change; runs until cancelled."""
        while True:
            await asyncio.sleep(CHECK_SECONDS)
            stamp = await asyncio.to_thread(self._mtimes)
            if stamp != self._stamp:
                await asyncio.to_thread(self.reload)


class _EncryptedKey(Exception):
    pass


def _encrypted_key() -> str:
    """Asked for only when the key is encrypted: refused, where OpenSSL would prompt."""
    raise _EncryptedKey


class _CurrentContext(ssl.SSLContext):
    """The listener's context: each connection is wrapped by the context loaded last, whole,
    so that the sessions of an older one, and the client CA it trusted, end with it (asyncio
    wraps every connection with ``wrap_bio``)."""

    server_tls: ServerTls

    def wrap_bio(
        self,
        incoming: ssl.MemoryBIO,
        outgoing: ssl.MemoryBIO,
        server_side: bool = False,
        server_hostname: str | bytes | None = None,
        session: ssl.SSLSession | None = None,
    ) -> ssl.SSLObject:
        return self.server_tls._current.wrap_bio(
            incoming, outgoing, server_side=server_side, server_hostname=server_hostname, session=session
        )


#: Asked by probes, which have no client certificate to give.
PROBE_PATHS: Final = frozenset({"/healthz", "/readyz"})


@web.middleware
async def client_certificate_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Mutual TLS for every request but the probes': a connection without a verified client
    certificate gets 401."""
    if request.path not in PROBE_PATHS:
        transport = request.transport
        if transport is None or not transport.get_extra_info("peercert"):
            raise Unauthorized("a client certificate signed by the configured CA is required")
    return await handler(request)
