"""Adapters around the core: the draft service (gRPC) now; Ray actors with issue 3."""
