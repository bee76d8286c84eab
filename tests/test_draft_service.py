"""The draft service over real gRPC on loopback: exact wire format, same blocks as in-process."""

import grpc
import pytest
import torch
from specserve.internal.v1 import draft_pb2 as pb

from specserve.actors.draft_service import create_server
from specserve.actors.remote_drafter import RemoteDrafter
from specserve.actors.wire import decode_probs, encode_probs, tensor_from_proto, tensor_to_proto
from specserve.cluster.runtime.drafters import NgramDrafter
from specserve.cluster.runtime.model_drafter import ModelDrafter
from specserve.cluster.runtime.engine import GenerationRequest, SpeculativeEngine
from specserve.cluster.runtime.models import layer_subset
from specserve.cluster.speculation import SamplingParams, warp_probs
from conftest import TINY_PROMPTS


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int64, torch.int32, torch.bool])
def test_tensors_travel_bit_exact(dtype):
    t = (torch.randn(3, 5, generator=torch.Generator().manual_seed(0)) * 100).to(dtype)
    back = tensor_from_proto(pb.Tensor.FromString(tensor_to_proto(t).SerializeToString()))
    assert back.dtype == dtype and torch.equal(back, t)
    assert tensor_from_proto(tensor_to_proto(torch.empty(0, 7))).shape == (0, 7)


def test_a_malformed_tensor_is_named():
    msg = tensor_to_proto(torch.ones(4))
    msg.data = msg.data[:-1]
    with pytest.raises(ValueError, match="tensor.data"):
        tensor_from_proto(msg)
    with pytest.raises(ValueError, match="tensor.dtype"):
        tensor_from_proto(pb.Tensor(dtype="complex64", shape=[1], data=b"12345678"))


@pytest.mark.parametrize(
    "params,layout",
    [
        (SamplingParams(temperature=1.0), "dense"),
        (SamplingParams(temperature=0.8, top_k=5), "sparse"),
        (SamplingParams(temperature=1.2, top_p=0.3), "sparse"),
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_draft_probs_are_exact_and_sparse_when_truncated(params, layout, dtype):
    logits = torch.randn(4, 258, generator=torch.Generator().manual_seed(1)) * 3
    q = warp_probs(logits, [params] * 4).to(dtype)  # q travels in the precision it was sampled from
    msg = encode_probs(q)
    assert msg.WhichOneof("layout") == layout
    back = decode_probs(pb.DraftProbs.FromString(msg.SerializeToString()))
    assert back.dtype == dtype and torch.equal(back, q)  # bit for bit, zeros where q had none
    if layout == "sparse":
        assert msg.ByteSize() < q.numel() * q.element_size()  # under the dense form's bytes
    else:  # no wider than it was sampled: a bf16 row costs 2 bytes an entry
        assert msg.ByteSize() < q.numel() * q.element_size() + 64


@pytest.fixture(scope="module")
def service(tiny_llama):
    draft = layer_subset(tiny_llama.model, [0, 1, 3])
    server, port = create_server(ModelDrafter(draft))
    server.start()
    remote = RemoteDrafter(f"127.0.0.1:{port}")
    yield draft, server, remote
    remote.close()
    server.stop(grace=None)


@pytest.mark.parametrize(
    "params", [SamplingParams(temperature=0.0), SamplingParams(temperature=1.0), SamplingParams(0.7, top_k=8)]
)
def test_remote_blocks_equal_in_process_blocks(service, tiny_llama, params):
    draft, _, remote = service
    local = ModelDrafter(draft)
    context = tiny_llama.tokenizer.encode("remote drafting")
    for round_, (accepted, extra) in enumerate([(0, 1), (3, 1), (4, 1), (1, 2), (2, 1)]):
        got = remote.propose(11, context, 4, params, seed=round_)
        want = local.propose(11, context, 4, params, seed=round_)
        assert got.token_ids == want.token_ids
        assert (got.probs is None) == (want.probs is None) == params.greedy
        if want.probs is not None:
            assert torch.equal(got.probs, want.probs)
        context = context + want.token_ids[:accepted] + [200 + round_] * extra
    remote.release(11)
    assert remote.health().sequences == 0


def test_service_that_lost_a_sequence_gets_it_resent(service, tiny_llama):
    draft, server, remote = service
    params = SamplingParams(temperature=1.0)
    context = tiny_llama.tokenizer.encode("lost and found")
    remote.propose(5, context, 3, params, seed=1)
    context = context + [65, 66]
    # a restarted replica at another address: it knows no sequence
    fresh_server, port = create_server(ModelDrafter(draft))
    fresh_server.start()
    try:
        moved = RemoteDrafter(f"127.0.0.1:{port}")
        moved._sent = dict(remote._sent)  # the client believes the service holds the context
        got = moved.propose(5, context, 3, params, seed=2)
        want = ModelDrafter(draft).propose(5, context, 3, params, seed=2)
        assert got.token_ids == want.token_ids and torch.equal(got.probs, want.probs)
        moved.close()
    finally:
        fresh_server.stop(grace=None)
    remote.release(5)


@pytest.mark.parametrize(
    "sampling,k,field",
    [
        (pb.Sampling(temperature=1.0, top_p=1.5), 2, "top_p"),
        (pb.Sampling(temperature=-1.0, top_p=1.0), 2, "temperature"),
        (pb.Sampling(temperature=1.0, top_p=1.0), 1000, "k"),
    ],
)
def test_bad_fields_are_invalid_argument(service, sampling, k, field):
    _, _, remote = service
    request = pb.ProposeRequest(seq_id=9, new_tokens=[1, 2, 3], context_len=3, reset=True, k=k, sampling=sampling)
    with pytest.raises(grpc.RpcError) as err:
        remote._stub.Propose(request, timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith(f"{field}:")


def test_engine_through_the_draft_service(service, tiny_llama):
    """The engine with a remote drafter: greedy equals plain, and seeded sampling equals the
    in-process engine's output token for token."""
    draft, _, remote = service
    remote_engine = SpeculativeEngine(tiny_llama.model, tiny_llama.tokenizer, remote, num_draft_tokens=3)
    local_engine = SpeculativeEngine(tiny_llama.model, tiny_llama.tokenizer, ModelDrafter(draft), num_draft_tokens=3)
    greedy = [GenerationRequest(p, 24) for p in TINY_PROMPTS]
    plain = [GenerationRequest(p, 24, num_draft_tokens=0) for p in TINY_PROMPTS]
    assert [r.token_ids for r in remote_engine.generate(greedy)] == [r.token_ids for r in local_engine.generate(plain)]
    sampled = [GenerationRequest(p, 24, SamplingParams(0.9, top_k=40, seed=i)) for i, p in enumerate(TINY_PROMPTS)]
    assert [r.token_ids for r in remote_engine.generate(sampled)] == [r.token_ids for r in local_engine.generate(sampled)]
    assert remote.health().sequences == 0  # finished sequences were released
    assert remote.bytes_received > 0


def test_ngram_service_sends_no_probabilities():
    server, port = create_server(NgramDrafter())
    server.start()
    try:
        remote = RemoteDrafter(f"127.0.0.1:{port}")
        block = remote.propose(1, [1, 2, 3, 1, 2], 2, SamplingParams(1.0), seed=0)
        assert block.token_ids == [3, 1] and block.probs is None
        assert remote.health().drafter == "ngram"
        remote.close()
    finally:
        server.stop(grace=None)


def test_ngram_trees_travel_over_the_service(tiny_llama):
    """A tree's parents cross the wire as drafted; the engine verifies remote trees exactly."""
    from specserve.cluster.speculation.round import DraftRequest

    server, port = create_server(NgramDrafter())
    server.start()
    try:
        remote = RemoteDrafter(f"127.0.0.1:{port}")
        ctx = [1, 2, 3, 4, 9, 1, 2, 3, 5, 9, 1, 2, 3, 4, 7, 9, 1, 2]
        got = remote.propose_many([DraftRequest(1, ctx, 4, SamplingParams(1.0), 0, max_nodes=8, max_branch=2)])[0]
        want = NgramDrafter().tree(ctx, 4, 8, 2)
        assert (got.token_ids, got.parents, got.probs) == (want.token_ids, want.parents, None) and want.parents
        request = pb.ProposeRequest(seq_id=2, new_tokens=[1, 2], context_len=2, reset=True, k=2, max_nodes=65,
                                    sampling=pb.Sampling(temperature=1.0, top_p=1.0))
        with pytest.raises(grpc.RpcError) as err:
            remote._stub.Propose(request, timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and err.value.details().startswith("max_nodes:")
        engine = SpeculativeEngine(tiny_llama.model, tiny_llama.tokenizer, remote, num_draft_tokens=4, tree_nodes=8,
                                   tree_branch=3)
        prompts = [p * 3 for p in TINY_PROMPTS]
        results = engine.generate([GenerationRequest(p, 32) for p in prompts])
        plain = engine.generate([GenerationRequest(p, 32, num_draft_tokens=0) for p in prompts])
        assert [r.token_ids for r in results] == [r.token_ids for r in plain]
        assert sum(r.stats.tree_rounds for r in results) > 0
        remote.close()
    finally:
        server.stop(grace=None)
