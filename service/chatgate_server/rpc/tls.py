"""TLS for the gRPC port, certificates re-read when their files change, and the
identity a client certificate proves.

``CHATGATE_TLS_CERT_FILE`` + ``CHATGATE_TLS_KEY_FILE`` turn TLS on; with
``CHATGATE_TLS_CLIENT_CA_FILE`` a client certificate signed by that CA is required
(mTLS). grpc asks :meth:`ReloadingTls.fetch` before each handshake; it compares the
three files' (mtime, size) and hands grpc new material only when one changed, so a
rotated certificate (cert-manager, a Kubernetes Secret update) is used for the next
connection without a restart, and the cost per handshake is three ``stat`` calls.
A file that is half written (the key no longer matches) is simply tried again at the
next handshake; until then the last good material stays in use.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class TlsFiles:
    cert: Path
    key: Path
    client_ca: Path | None = None

    def paths(self) -> tuple[Path, ...]:
        return (self.cert, self.key) if self.client_ca is None else (self.cert, self.key, self.client_ca)


class ReloadingTls:
    """Server credentials that follow their files."""

    def __init__(self, files: TlsFiles) -> None:
        self._files = files
        self._signature = self._stat()
        self._initial = self._configuration()

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.dynamic_ssl_server_credentials(
            self._initial,
            # grpc documents None from the fetcher as "keep the current material"; the
            # stubs type the return as never None.
            self.fetch,  # type: ignore[arg-type]
            require_client_authentication=self._files.client_ca is not None,
        )

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """New material if a file changed since the last call, else None (keep the current)."""
        try:
            signature = self._stat()
            if signature == self._signature:
                return None
            configuration = self._configuration()
        except OSError as exc:
            log.warning("cannot re-read the TLS files (%s); keeping the current certificate", exc.strerror)
            return None
        self._signature = signature
        log.info("TLS certificate files changed: new connections use the new material")
        return configuration

    def _stat(self) -> tuple[tuple[int, int], ...]:
        stats = [path.stat() for path in self._files.paths()]
        return tuple((s.st_mtime_ns, s.st_size) for s in stats)

    def _configuration(self) -> grpc.ServerCertificateConfiguration:
        pair = (self._files.key.read_bytes(), self._files.cert.read_bytes())
        ca = self._files.client_ca.read_bytes() if self._files.client_ca is not None else None
        return grpc.ssl_server_certificate_configuration([pair], root_certificates=ca)


def certificate_identity(auth_context: Mapping[str, Any]) -> str | None:
    """The identity a verified client certificate proves: its first URI SAN (a SPIFFE id,
    say), else its subject; None without a client certificate.

    ``auth_context`` is ``ServicerContext.auth_context()``: property names to lists of
    bytes (the stubs say bytes; grpc gives lists)."""
    for key in ("peer_spiffe_id", "peer_uri"):
        for value in auth_context.get(key, ()):
            return str(value.decode(errors="replace"))
    for value in auth_context.get("x509_subject", ()):
        return str(value.decode(errors="replace"))
    return None
