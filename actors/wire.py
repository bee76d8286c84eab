"""Tensors and draft distributions on the wire: raw bytes with dtype and shape, never pickled."""

from __future__ import annotations

import torch
from specserve.internal.v1 import draft_pb2 as pb

DTYPES = {name: getattr(torch, name) for name in ("float32", "float16", "bfloat16", "int64", "int32", "uint8", "bool")}


def tensor_to_proto(t: torch.Tensor) -> pb.Tensor:
    t = t.detach().cpu().contiguous()
    name = str(t.dtype).removeprefix("torch.")
    if name not in DTYPES:
        raise ValueError(f"tensor dtype {name} cannot travel; supported: {', '.join(DTYPES)}")
    return pb.Tensor(dtype=name, shape=list(t.shape), data=t.reshape(-1).view(torch.uint8).numpy().tobytes())


def tensor_from_proto(msg: pb.Tensor) -> torch.Tensor:
    if msg.dtype not in DTYPES:
        raise ValueError(f"tensor.dtype: unsupported {msg.dtype!r}")
    dtype, shape = DTYPES[msg.dtype], list(msg.shape)
    numel = 1
    for n in shape:
        numel *= n
    itemsize = torch.empty(0, dtype=dtype).element_size()
    if len(msg.data) != numel * itemsize:
        raise ValueError(f"tensor.data: {len(msg.data)} bytes for shape {shape} of {msg.dtype}")
    if numel == 0:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(bytearray(msg.data), dtype=torch.uint8).view(dtype).reshape(shape)


def encode_probs(q: torch.Tensor) -> pb.DraftProbs:
    """q [k, V] float32 -> DraftProbs, sparse (CSR, int32 ids) when that is smaller. Bit-exact."""
    k, vocab = q.shape
    support = q > 0
    nnz = int(support.sum())
    if nnz * 8 >= q.numel() * 4:  # ids + values cost 8 bytes an entry, a dense entry 4
        return pb.DraftProbs(vocab_size=vocab, dense=tensor_to_proto(q.float()))
    rows, ids = support.nonzero(as_tuple=True)
    offsets = torch.zeros(k + 1, dtype=torch.int64)
    offsets[1:] = torch.bincount(rows, minlength=k).cumsum(0)
    return pb.DraftProbs(
        vocab_size=vocab,
        sparse=pb.SparseRows(
            row_offsets=tensor_to_proto(offsets),
            ids=tensor_to_proto(ids.to(torch.int32)),
            probs=tensor_to_proto(q[rows, ids].float()),
        ),
    )


def decode_probs(msg: pb.DraftProbs) -> torch.Tensor:
    """DraftProbs -> q [k, V] float32, equal bit for bit to what was encoded."""
    if msg.WhichOneof("layout") == "dense":
        return tensor_from_proto(msg.dense)
    sparse = msg.sparse
    offsets = tensor_from_proto(sparse.row_offsets)
    ids = tensor_from_proto(sparse.ids).long()
    values = tensor_from_proto(sparse.probs)
    k = offsets.numel() - 1
    rows = torch.repeat_interleave(torch.arange(k), offsets.diff())
    q = torch.zeros(k, msg.vocab_size, dtype=torch.float32)
    q[rows, ids] = values
    return q
