"""Acceptance on the target's device: a round reads the host a constant number of times, whatever
the batch, and greedy or local drafts send no vocabulary-sized row to the host."""

import pytest

from conftest import TINY_PROMPTS, tiny_config
from specserve.cluster.runtime.engine import GenerationRequest
from specserve.cluster.runtime.factory import make_engine
from specserve.cluster.speculation import SamplingParams
from specserve.cluster.speculation.host import HostTransfers

CASES = {  # drafter, K, tree nodes
    "ngram chain": ("ngram", 4, 0),
    "ngram tree": ("ngram", 4, 6),
    "model chain": ("model", 3, 0),
}


def rounds(tiny_llama, drafter, k, nodes, temperature, batch):
    config = tiny_config(drafter=drafter, k=k)
    config = config.model_copy(update={"speculation": config.speculation.model_copy(
        update={"tree": config.speculation.tree.model_copy(update={"max_nodes": nodes})})})
    engine = make_engine(config, tiny_llama)
    for i in range(batch):
        sampling = SamplingParams(temperature=temperature, seed=i)
        engine.add_request(GenerationRequest(TINY_PROMPTS[i % len(TINY_PROMPTS)], 12, sampling))
    seen = []
    while engine.has_unfinished():
        engine.step()
        r = engine.last_round
        if r.batch:
            seen.append((r.batch, r.host_syncs, r.host_bytes))
    return engine, seen


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_host_reads_a_round_do_not_grow_with_the_batch(tiny_llama, one_thread, case, temperature):
    drafter, k, nodes = CASES[case]
    syncs = {}
    for batch in (1, 6):
        engine, seen = rounds(tiny_llama, drafter, k, nodes, temperature, batch)
        vocab_row = engine.target.vocab_size * 4  # one float32 row of p
        assert seen and all(s >= 1 for _, s, _ in seen)
        assert all(b < vocab_row for _, _, b in seen), "a vocabulary-sized row reached the host"
        syncs[batch] = max(s for _, s, _ in seen)
    kinds = 1 if nodes == 0 else 2  # chains of one temperature: one read; trees may leave chains too
    assert syncs[1] <= kinds and syncs[6] <= kinds, syncs


def test_the_counter_sees_a_per_sequence_reader(tiny_llama, one_thread):
    """Negative control: reading each sequence's tokens by itself (what the engine once did)
    counts one synchronisation per sequence, which the test above would refuse."""
    engine, _ = rounds(tiny_llama, "ngram", 4, 0, 0.0, 1)
    import torch

    from specserve.cluster.speculation import greedy_accept

    out = greedy_accept(torch.arange(12) % 5, torch.zeros(6, dtype=torch.long), [1] * 6)
    host = HostTransfers()
    for i in range(6):
        host.read(out.token_ids[i, : 1 + int(host.read(out.num_accepted[i : i + 1])[0])])
    assert host.syncs == 12
    once = HostTransfers()
    out.to_host(once)
    assert once.syncs == 1


def phase_reads(engine, monkeypatch) -> list[tuple[int, int]]:
    """Per round (batch, every read of a tensor by the host inside verification and acceptance),
    counted at torch.Tensor itself (test_core_device.host_reads): a stray .item() counts too."""
    from test_core_device import host_reads

    seen, inner = [], {}

    def counted(name):
        original = getattr(engine, name)

        def run(seqs, *args, **kwargs):
            with host_reads() as calls:
                out = original(seqs, *args, **kwargs)
            inner[name] = len(calls)
            if name == "_accept":
                seen.append((len(seqs), inner.pop("_verify", 0) + inner.pop("_accept")))
            return out
        monkeypatch.setattr(engine, name, run)

    counted("_verify")
    counted("_accept")
    return seen


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_every_host_read_of_verify_and_accept_is_counted(tiny_llama, one_thread, monkeypatch, case, temperature):
    """All reads of a tensor in a round's verification and acceptance, not only the ones the engine
    routes through HostTransfers: as many as it reports, at most one per kind of block, at 1 and 6
    sequences alike."""
    drafter, k, nodes = CASES[case]
    config = tiny_config(drafter=drafter, k=k)
    config = config.model_copy(update={"speculation": config.speculation.model_copy(
        update={"tree": config.speculation.tree.model_copy(update={"max_nodes": nodes})})})
    kinds = 1 if nodes == 0 else 2
    for batch in (1, 6):
        engine = make_engine(config, tiny_llama)
        seen = phase_reads(engine, monkeypatch)
        for i in range(batch):
            engine.add_request(GenerationRequest(TINY_PROMPTS[i % len(TINY_PROMPTS)], 12,
                                                 SamplingParams(temperature=temperature, seed=i)))
        reported = []
        while engine.has_unfinished():
            engine.step()
            if engine.last_round.batch:
                reported.append(engine.last_round.host_syncs)
        assert seen and [n for _, n in seen] == reported
        assert max(reported) <= kinds and any(b == batch for b, _ in seen)


def test_a_stray_read_is_seen(tiny_llama, one_thread, monkeypatch):
    """Negative control: an acceptance that reads one value per sequence is counted B times a round."""
    import torch

    engine = make_engine(tiny_config(drafter="ngram", k=4), tiny_llama)
    accept = engine._accept

    def per_sequence(seqs, blocks, verified, timing):
        for o in verified:
            torch.as_tensor(o.scores).reshape(-1)[0].item()
        return accept(seqs, blocks, verified, timing)

    monkeypatch.setattr(engine, "_accept", per_sequence)
    seen = phase_reads(engine, monkeypatch)
    for i in range(6):
        engine.add_request(GenerationRequest(TINY_PROMPTS[i % len(TINY_PROMPTS)], 6))
    engine.step()
    engine.step()
    assert any(b == 6 and n >= 6 for b, n in seen)
