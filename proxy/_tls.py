"""HTTPS for the listener: the server's SSL context, and reloading its certificate.

The context is built once; ``reload`` loads the certificate and key again into the same
context, so connections already open keep going and new ones get the new certificate. It is
called on SIGHUP and when the files' modification times change (checked every 30 s). A file
that cannot be read or does not match is a configuration error naming the key; on a reload
the old certificate stays in use and the failure is logged.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from pathlib import Path
from typing import Final

from moorage.config import ConfigError, TlsSettings

__all__ = ["ServerTls"]

log = logging.getLogger("moorage")
CHECK_SECONDS: Final = 30.0


class ServerTls:
    def __init__(self, settings: TlsSettings) -> None:
        self.settings = settings
        self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.context.minimum_version = ssl.TLSVersion.TLSv1_2
        self._load()
        self._stamp = self._mtimes()

    def _load(self) -> None:
        settings = self.settings
        try:
            self.context.load_cert_chain(settings.cert_file, settings.key_file)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(
                "the configuration", [f"tls.cert_file/tls.key_file: cannot load {settings.cert_file}: {exc}"]
            ) from None
        if settings.client_ca_file is not None:
            try:
                self.context.load_verify_locations(settings.client_ca_file)
            except (OSError, ssl.SSLError) as exc:
                raise ConfigError(
                    "the configuration", [f"tls.client_ca_file: cannot load {settings.client_ca_file}: {exc}"]
                ) from None
            self.context.verify_mode = ssl.CERT_REQUIRED

    def _mtimes(self) -> tuple[float, ...]:
        files = [self.settings.cert_file, self.settings.key_file, self.settings.client_ca_file]
        return tuple(Path(f).stat().st_mtime if f is not None and Path(f).exists() else 0.0 for f in files)

    def reload(self) -> None:
        """Load the files again; keep the current certificate if they are broken."""
        try:
            self._load()
        except ConfigError as error:
            log.error("certificate not reloaded", extra={"event": "tls_reload_failed", "error": str(error)})
            return
        self._stamp = self._mtimes()
        log.info("certificate reloaded", extra={"event": "tls_reloaded", "cert_file": str(self.settings.cert_file)})

    async def watch(self) -> None:
        """Reload when the files change; runs until cancelled."""
        while True:
            await asyncio.sleep(CHECK_SECONDS)
            stamp = await asyncio.to_thread(self._mtimes)
            if stamp != self._stamp:
                await asyncio.to_thread(self.reload)
