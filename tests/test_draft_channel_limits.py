"""The draft channel's message limits, over real gRPC on loopback: set from the config's largest
block on both ends, a sampled 64-node tree at a 152,000-id vocabulary (39 MB of q) arrives bit for
bit and is accepted as the local block is; gRPC's default 4 MiB stops the same block (the negative
control); a block over the limits is refused by name, never counted as a replica failure or
turned into K = 0."""

import grpc
import pytest
import torch

from specserve.actors.draft_pool import DraftPool
from specserve.actors.draft_service import DraftServicer, create_server
from specserve.actors.remote_drafter import RemoteDrafter
from specserve.actors.wire import GRPC_DEFAULT_MESSAGE_BYTES, DraftTooLarge, draft_message_limit
from specserve.cluster.config import parse_config
from specserve.cluster.runtime.engine import GenerationRequest, SpeculativeEngine
from specserve.cluster.runtime.model_drafter import ModelDrafter
from specserve.cluster.runtime.tokenizer import ByteTokenizer
from specserve.cluster.speculation import DraftTree, SamplingParams, accept_trees, make_generator
from specserve.cluster.speculation.round import DraftRequest

VOCAB = 152_000
NODES = 64  # two sampled root children, each continued as a chain of 32
CONFIG = parse_config({"speculation": {"max_draft_tokens": 32, "tree": {"max_nodes": NODES, "max_branch": 2}}})
LIMIT = draft_message_limit(VOCAB, CONFIG.speculation.block_nodes)
TREE = DraftRequest(1, list(range(1, 11)), 32, SamplingParams(temperature=1.0), seed=7, max_nodes=NODES, max_branch=2)


@pytest.fixture(scope="module")
def big_vocab():
    """A one-layer causal LM with VOCAB ids (dense q rows of 608 kB), the same weights every time."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    shape = Qwen2Config(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                        num_key_value_heads=1, max_position_embeddings=512, tie_word_embeddings=True, initializer_range=0.5)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(shape, dtype=torch.float32)
    return model.eval()


def _serve(model, limit: int):
    servicer = DraftServicer(ModelDrafter(model), max_message_bytes=limit)
    server, port = create_server(servicer.drafter, servicer=servicer)
    server.start()
    return server, f"127.0.0.1:{port}"


@pytest.fixture(scope="module")
def service(big_vocab, one_thread):
    server, address = _serve(big_vocab, LIMIT)
    yield address
    server.stop(grace=None)


def test_the_limit_fits_the_largest_block():
    assert CONFIG.speculation.block_nodes == NODES
    assert LIMIT >= NODES * VOCAB * 4 > 9 * GRPC_DEFAULT_MESSAGE_BYTES
    assert draft_message_limit(258, 8) == GRPC_DEFAULT_MESSAGE_BYTES  # never below gRPC's default
    # the sizes: 22 rows at 49,152 ids and 9 at 128,256 no longer fit 4 MiB
    assert draft_message_limit(49_152, 22) > GRPC_DEFAULT_MESSAGE_BYTES
    assert draft_message_limit(128_256, 9) > GRPC_DEFAULT_MESSAGE_BYTES
    assert draft_message_limit(VOCAB, 8, sequences=2) == 2 * draft_message_limit(VOCAB, 8)
    with pytest.raises(DraftTooLarge, match="speculation.tree.max_nodes"):
        draft_message_limit(10_000_000, 64)


def _target_rows(q: torch.Tensor, parents: tuple[int, ...], seed: int) -> torch.Tensor:
    """[n + 1, V] target rows close to the draft's: half the q a node's children were drawn from,
    half noise, so acceptance walks some way into the tree and stops at different depths."""
    noise = torch.rand(len(parents) + 1, q.shape[1], generator=torch.Generator().manual_seed(seed))
    p = noise / noise.sum(-1, keepdim=True)
    for j, parent in enumerate(parents):
        p[parent + 1] = 0.5 * q[j] + 0.5 * noise[parent + 1] / noise[parent + 1].sum()
    return p


def test_a_sampled_64_node_tree_at_152k_ids_arrives_exact(service, big_vocab):
    remote = RemoteDrafter(service, max_message_bytes=LIMIT)
    try:
        got = remote.propose_many([TREE])[0]
        assert remote.bytes_received > 9 * GRPC_DEFAULT_MESSAGE_BYTES  # one message of 39 MB
    finally:
        remote.close()
    want = ModelDrafter(big_vocab).propose_many([TREE])[0]  # what the replica computed, computed here
    assert len(want) == NODES and want.parents is not None and want.probs.shape == (NODES, VOCAB)
    assert bool((want.probs > 0).all())  # dense rows: the dense layout travelled
    assert (got.token_ids, got.parents) == (want.token_ids, want.parents)
    assert got.probs.dtype == torch.float32 and torch.equal(got.probs.view(torch.int32), want.probs.view(torch.int32))
    # acceptance on the received block is the local block's, draw for draw
    trees = [DraftTree(tuple(b.token_ids), b.parents, b.probs) for b in (got, want)]
    accepted = []
    for seed in range(8):
        p = _target_rows(want.probs, want.parents, seed)
        there, here = (accept_trees([p], [t], [False], [make_generator(seed)])[0] for t in trees)
        assert there == here
        accepted.append(here.num_accepted)
    assert max(accepted) > 1  # not a walk that stops at the root every time


def test_grpc_default_limit_stops_the_same_block(service):
    """The negative control: a client at gRPC's default 4 MiB gets RESOURCE_EXHAUSTED, which the
    remote drafter names instead of passing on as a replica failure."""
    remote = RemoteDrafter(service)  # no limits set: gRPC's defaults
    try:
        with pytest.raises(grpc.RpcError) as err:
            remote._stub.Propose(remote._request(TREE, None), timeout=30)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "larger than max" in err.value.details()
        with pytest.raises(DraftTooLarge, match=f"larger than max .* vs. {GRPC_DEFAULT_MESSAGE_BYTES}"):
            remote.propose_many([TREE])
    finally:
        remote.close()


def test_a_block_over_the_limit_is_refused_by_name_not_k0(big_vocab, one_thread):
    """A replica whose config bounds blocks at 8 nodes gets a request for 64 (larger than its
    config allows): OUT_OF_RANGE naming the sizes and keys; the pool raises DraftTooLarge, keeps the
    replica and falls back to nothing."""
    small = draft_message_limit(VOCAB, 8)
    server, address = _serve(big_vocab, small)
    pool = DraftPool([address], timeout_s=30, max_message_bytes=LIMIT)
    try:
        with pytest.raises(DraftTooLarge) as err:
            pool.propose_many([TREE])
        message = str(err.value)
        for part in (f"{NODES} nodes", f"{VOCAB} ids", f"limit of {small}", "speculation.max_draft_tokens",
                     "speculation.tree.max_nodes", "max_nodes 64"):
            assert part in message
        assert pool.alive == [True] and pool.fallbacks == 0 and pool.moved == 0
        # the replica is fine: a block within its bounds comes back (the context resent whole)
        chain = DraftRequest(1, TREE.context, 8, TREE.params, seed=3)
        assert len(pool.propose_many([chain])[0]) == 8
    finally:
        pool.close()
        server.stop(grace=None)


def test_an_engine_over_a_too_small_channel_raises_instead_of_k0(service, big_vocab):
    """The issue's failure: 8 sampled rows at 152,000 ids (4.9 MB) over gRPC's default 4 MiB used to
    decode at K = 0 in silence; the round now fails with DraftTooLarge."""
    pool = DraftPool([service], timeout_s=30)  # gRPC's default limits
    engine = SpeculativeEngine(big_vocab, ByteTokenizer(), pool, num_draft_tokens=8, max_draft_tokens=8)
    try:
        with pytest.raises(DraftTooLarge, match="larger than max"):
            engine.generate([GenerationRequest("", 16, SamplingParams(1.0, seed=1), prompt_ids=(1, 2, 3, 4))])
        assert pool.alive == [True] and pool.fallbacks == 0
    finally:
        pool.close()


def test_sampled_trees_over_the_channel_equal_in_process_decoding(service, big_vocab):
    """End to end: 64-node sampled trees drafted on the replica, verified and accepted here, give
    the in-process engine's output token for token."""
    pool = DraftPool([service], timeout_s=30, max_message_bytes=LIMIT)
    shape = dict(num_draft_tokens=32, max_draft_tokens=32, tree_nodes=NODES, tree_branch=2)
    remote = SpeculativeEngine(big_vocab, ByteTokenizer(), pool, **shape)
    local = SpeculativeEngine(big_vocab, ByteTokenizer(), ModelDrafter(big_vocab), **shape)
    requests = [GenerationRequest("", 40, SamplingParams(1.0, seed=s), prompt_ids=(5, 6, 7, 8)) for s in range(2)]
    try:
        results = remote.generate(requests)
        assert [r.token_ids for r in results] == [r.token_ids for r in local.generate(requests)]
        assert NODES in [k for r in results for k in r.stats.rounds_k] and pool.fallbacks == 0
    finally:
        pool.close()
