"""A gRPC client of the public API (what `specserve generate --address` uses)."""

from __future__ import annotations

from typing import Iterator

import grpc
from specserve.v1 import generation_pb2 as pb
from specserve.v1 import generation_pb2_grpc as pb_grpc

API_TOKEN_ENV = "SPECSERVE_API_TOKEN"  # where the service (and the CLI's --token) read the API token


class Client:
    def __init__(self, address: str, app_name: str = "specserve", timeout_s: float | None = None,
                 token: str | None = None, tls: bool = False):
        """token: the service's API token (sent as a bearer token); tls: dial with TLS (an Ingress
        that terminates it), verified against the system's root certificates."""
        self.channel = grpc.secure_channel(address, grpc.ssl_channel_credentials()) if tls else grpc.insecure_channel(address)
        self.stub = pb_grpc.SpeculativeGenerationStub(self.channel)
        self.metadata = (("application", app_name),)  # Serve's gRPC proxy routes by app name
        if token:
            self.metadata += (("authorization", f"Bearer {token}"),)
        self.timeout_s = timeout_s

    def generate(self, request: pb.GenerateRequest) -> pb.GenerateResponse:
        return self.stub.Generate(request, metadata=self.metadata, timeout=self.timeout_s)

    def stream(self, request: pb.GenerateRequest) -> Iterator[pb.GenerateResponse]:
        return self.stub.GenerateStream(request, metadata=self.metadata, timeout=self.timeout_s)

    def health(self) -> pb.HealthResponse:
        return self.stub.Health(pb.HealthRequest(), metadata=self.metadata, timeout=self.timeout_s)

    def close(self) -> None:
        self.channel.close()


def proto_request(prompt: str, max_new_tokens: int, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                  seed: int | None = None, num_draft_tokens: int | None = None, stop=()) -> pb.GenerateRequest:
    msg = pb.GenerateRequest(prompt=prompt, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                             top_p=top_p, stop=list(stop))
    if seed is not None:
        msg.seed = seed
    if num_draft_tokens is not None:
        msg.num_draft_tokens = num_draft_tokens
    return msg
