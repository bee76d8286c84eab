"""The internal draft channel: mutual TLS (cluster.draft_tls) from PEM files, and its message limits."""

from __future__ import annotations

from pathlib import Path

import grpc

from specserve.cluster.config import ConfigError, DraftTls

from .wire import message_options


def _read(tls: DraftTls, field: str) -> bytes:
    path = Path(getattr(tls, field))
    try:
        return path.read_bytes()
    except OSError as e:
        raise ConfigError(f"cluster.draft_tls.{field}: cannot read {path}: {e.strerror}") from None


def server_credentials(tls: DraftTls) -> grpc.ServerCredentials:
    """A replica's: its certificate, and only clients whose certificate the CA signed."""
    return grpc.ssl_server_credentials([(_read(tls, "key_file"), _read(tls, "cert_file"))],
                                       root_certificates=_read(tls, "ca_file"), require_client_auth=True)


def channel(address: str, tls: DraftTls | None, max_message_bytes: int | None = None) -> grpc.Channel:
    """A channel to a replica: plaintext, or mutual TLS checking the replica's name. max_message_bytes
    (wire.draft_message_limit): both message limits; None: gRPC's defaults (4 MiB received)."""
    options = message_options(max_message_bytes)
    if tls is None:
        return grpc.insecure_channel(address, options=options)
    credentials = grpc.ssl_channel_credentials(_read(tls, "ca_file"), _read(tls, "key_file"), _read(tls, "cert_file"))
    return grpc.secure_channel(address, credentials, options=[("grpc.ssl_target_name_override", tls.server_name), *options])
