"""Counting what leaves the device: every read of a tensor by the host is a synchronisation."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class HostTransfers:
    """A counter a caller passes to the core's readers (RejectionOutput.to_host, accept_trees)."""

    syncs: int = 0  # host reads (each waits for the device)
    bytes: int = 0  # bytes they moved

    def read(self, tensor: torch.Tensor) -> list:
        """tensor.tolist(), counted as one synchronisation."""
        self.syncs += 1
        self.bytes += tensor.numel() * tensor.element_size()
        return tensor.tolist()

    def reset(self) -> None:
        self.syncs = 0
        self.bytes = 0


def read(tensor: torch.Tensor, host: HostTransfers | None) -> list:
    """tensor.tolist() through `host` when one is given."""
    return host.read(tensor) if host is not None else tensor.tolist()


def to_device(tensor: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """tensor on device without waiting for it: a host tensor goes through pinned memory,
    non-blocking (a pageable copy would synchronise the stream)."""
    device = torch.device(device)
    if tensor.device.type == device.type and (device.index is None or tensor.device == device):
        return tensor
    if tensor.device.type == "cpu" and device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)
