"""Tensors and draft distributions on the wire: raw bytes with dtype and shape, never pickled."""

from __future__ import annotations

import torch
from specserve.internal.v1 import draft_pb2 as pb

DTYPES = {name: getattr(torch, name) for name in ("float32", "float16", "bfloat16", "int64", "int32", "uint8", "bool")}
Q_BYTES = 4  # a value of q on the wire at most: float32 (encode_probs sends q in the precision it was sampled in)
GRPC_DEFAULT_MESSAGE_BYTES = 4 * 1024 * 1024  # gRPC's own receive limit: the floor of the draft channel's
GRPC_MAX_MESSAGE_BYTES = 2**31 - 1  # what a gRPC channel option (an int32) and a protobuf message can hold
NODE_BYTES = 32  # a node's id and parent varints (-1 takes 10 bytes), and its row offset in the sparse form
FRAMING_BYTES = 4096  # the rest of a reply: tags, lengths, dtype names, shapes, vocab_size, compute_s


class DraftTooLarge(RuntimeError):
    """A draft block that does not fit the draft channel's message limit. Not a replica failure (it
    would fail the same way on every replica) and never a silent K = 0: it reaches the caller."""


def draft_message_limit(vocab: int, nodes: int, sequences: int = 1, bytes_per_value: int = Q_BYTES) -> int:
    """The draft channel's message limit in bytes: the largest reply, `sequences` blocks (a Propose
    carries one) of `nodes` dense q rows of `vocab` values (the sparse form is never larger but by its
    row offsets), with their ids, parents and framing; never below gRPC's default 4 MiB (which also
    bounds the contexts the requests carry)."""
    block = nodes * (vocab * bytes_per_value + NODE_BYTES) + FRAMING_BYTES
    limit = max(GRPC_DEFAULT_MESSAGE_BYTES, sequences * block)
    if limit > GRPC_MAX_MESSAGE_BYTES:
        raise DraftTooLarge(f"a draft block of {nodes} nodes at a vocabulary of {vocab} ids ({limit} bytes) exceeds the "
                            f"{GRPC_MAX_MESSAGE_BYTES} bytes a gRPC message can hold: lower speculation.max_draft_tokens "
                            "and speculation.tree.max_nodes")
    return limit


def message_options(max_message_bytes: int | None) -> list[tuple[str, int]]:
    """gRPC channel / server options setting both message limits (None: gRPC's defaults)."""
    if max_message_bytes is None:
        return []
    return [("grpc.max_send_message_length", max_message_bytes), ("grpc.max_receive_message_length", max_message_bytes)]


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
    """q [k, V] -> DraftProbs in the precision q was sampled from (float32, bfloat16, float16), sparse
    (CSR, int32 ids) when that is smaller. Bit-exact."""
    k, vocab = q.shape
    support = q > 0
    nnz = int(support.sum())
    if nnz * (4 + q.element_size()) >= q.numel() * q.element_size():  # an entry: its id and value, or a dense value
        return pb.DraftProbs(vocab_size=vocab, dense=tensor_to_proto(q))
    rows, ids = support.nonzero(as_tuple=True)
    offsets = torch.zeros(k + 1, dtype=torch.int64)
    offsets[1:] = torch.bincount(rows, minlength=k).cumsum(0)
    return pb.DraftProbs(
        vocab_size=vocab,
        sparse=pb.SparseRows(
            row_offsets=tensor_to_proto(offsets),
            ids=tensor_to_proto(ids.to(torch.int32)),
            probs=tensor_to_proto(q[rows, ids]),
        ),
    )


def decode_probs(msg: pb.DraftProbs) -> torch.Tensor:
    """DraftProbs -> q [k, V] in the dtype it was sent in, equal bit for bit to what was encoded."""
    if msg.WhichOneof("layout") == "dense":
        return tensor_from_proto(msg.dense)
    sparse = msg.sparse
    offsets = tensor_from_proto(sparse.row_offsets)
    ids = tensor_from_proto(sparse.ids).long()
    values = tensor_from_proto(sparse.probs)
    k = offsets.numel() - 1
    rows = torch.repeat_interleave(torch.arange(k), offsets.diff())
    q = torch.zeros(k, msg.vocab_size, dtype=values.dtype)
    q[rows, ids] = values
    return q
