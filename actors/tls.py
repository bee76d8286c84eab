"""Mutual TLS for the internal draft channel (cluster.draft_tls): credentials from PEM files."""

from __future__ import annotations

from pathlib import Path

import grpc

from cluster.config import ConfigError, DraftTls


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


def channel(address: str, tls: DraftTls | None) -> grpc.Channel:
    """A channel to a replica: plaintext, or mutual TLS checking the replica's name."""
    if tls is None:
        return grpc.insecure_channel(address)
    credentials = grpc.ssl_channel_credentials(_read(tls, "ca_file"), _read(tls, "key_file"), _read(tls, "cert_file"))
    return grpc.secure_channel(address, credentials, options=[("grpc.ssl_target_name_override", tls.server_name)])
