"""PaSS (drafter `pass`): look-ahead embeddings, their training, and drafting fused into the
round's one forward, exactly."""

import json

import pytest
import torch

from specserve.cluster.config import parse_config
from specserve.cluster.runtime.engine import GenerationRequest, SpeculativeEngine
from specserve.cluster.runtime.head import target_signature
from specserve.cluster.runtime.kv import CausalLM
from specserve.cluster.runtime.lookahead import LookaheadEmbeddings, install, uninstall
from specserve.cluster.runtime.models import load_model
from specserve.cluster.runtime.pass_drafter import PassDrafter
from specserve.cluster.speculation import CostModel, SamplingParams
from specserve.cluster.training.features import cut_windows
from specserve.cluster.training.train_lookahead import LookaheadTraining, lookahead_forward, train_lookahead
from conftest import TINY_PROMPTS, assert_greedy_equals_plain_on_smollm2, hf_greedy, local_records, tiny_distributed

pytestmark = pytest.mark.usefixtures("one_thread")

QUICK = LookaheadTraining(lookahead=3, steps=30, batch=2, anchors=8, eval_every=15, eval_windows=4, lr=5e-2,
                          precision="float32")


@pytest.fixture(scope="module")
def tiny():
    """A tiny target of its own (look-ahead embeddings are installed into it)."""
    return load_model("tiny-llama")


@pytest.fixture(scope="module")
def tiny_windows(tiny):
    return cut_windows(local_records(tiny.tokenizer, 12_000), 48)


@pytest.fixture(scope="module")
def trained(tiny, tiny_windows, tmp_path_factory):
    """Look-ahead embeddings trained briefly for the tiny target, saved; the log and per-position report."""
    path = str(tmp_path_factory.mktemp("pass") / "la.pt")
    before = {k: v.clone() for k, v in tiny.model.state_dict().items()}
    la, log, per_position = train_lookahead(tiny.model, tiny_windows.tokens, tiny_windows.held_out, QUICK, path,
                                            progress=False)
    return path, la, log, per_position, before


def _engine(tiny, path: str, k, cost: CostModel | None = None) -> SpeculativeEngine:
    la = LookaheadEmbeddings.load(path, target_signature(tiny.model))
    drafter = PassDrafter(install(tiny.model, la), la.prior_alpha)
    return SpeculativeEngine(tiny.model, tiny.tokenizer, drafter, num_draft_tokens=k, max_draft_tokens=6,
                             cost_model=cost or CostModel(0.0, tuple(1.0 + 0.01 * j for j in range(7))), prior_alpha=0.6)


def test_training_lowers_held_out_loss_and_changes_only_the_embeddings(tiny, trained):
    path, la, log, per_position, before = trained
    assert log.eval_loss[-1] < log.eval_loss[0]
    after = tiny.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # the target is frozen
    assert all(not p.requires_grad or p is la.vectors for p in tiny.model.parameters())
    assert len(per_position["agreement"]) == 3 and len(per_position["expected_acceptance"]) == 3
    again = LookaheadEmbeddings.load(path, target_signature(tiny.model))
    assert torch.equal(again.vectors, la.vectors.detach().float()) and again.prior_alpha == per_position["agreement"][0]
    other = load_model("tiny-qwen2")
    with pytest.raises(ValueError, match="draft.pass.embeddings"):
        LookaheadEmbeddings.load(path, target_signature(other.model))


def test_the_training_layout_is_what_serving_computes(tiny, trained):
    """The look-ahead rows of a training forward (many blocks in one window) equal those of a
    flattened serving forward of the prefix and one block: the mask and positions agree."""
    la = trained[1]
    window = torch.tensor([list(range(5, 35))])
    ids = install(tiny.model, la)
    lm = CausalLM(tiny.model)
    with torch.no_grad():
        rows, _, labels, slot = lookahead_forward(tiny.model, la, window, [6, 20])
    for j, a in enumerate([6, 20]):
        cache = lm.new_cache()
        served = lm.forward_batch([cache], [window[0, : a + 1].tolist() + ids])[0][-len(ids):]
        lm.release(cache)
        assert torch.allclose(rows[0, 3 * j : 3 * j + 3], served, atol=1e-4)
    assert labels[:3] == [8, 9, 10] and slot[:3] == [0, 1, 2]


@pytest.mark.parametrize("k", [2, None])
def test_greedy_with_pass_equals_plain_greedy(tiny, trained, k):
    engine = _engine(tiny, trained[0], k if k is not None else "adaptive")
    prompts = [tiny.tokenizer.encode(p) for p in TINY_PROMPTS]
    results = engine.generate([GenerationRequest("", 32, SamplingParams(temperature=0.0), prompt_ids=p) for p in prompts])
    eos = tiny.tokenizer.eos_token_id
    for ids, r in zip(prompts, results):
        assert r.token_ids == hf_greedy(tiny.model, ids, 32, eos)[: len(r.token_ids)]
    assert sum(r.stats.draft_tokens for r in results) > 50 and sum(r.stats.accepted_tokens for r in results) > 0
    assert all(n <= 3 for r in results for n in r.stats.rounds_k)  # never more than L drafts


def test_look_ahead_tokens_leave_no_trace_in_the_kv_store(tiny, trained):
    """After PaSS rounds the target's cache gives the logits of a fresh prefill of the committed
    tokens; a cache that kept one look-ahead block (the negative control) does not."""
    engine = _engine(tiny, trained[0], 2)
    ids = tiny.tokenizer.encode(TINY_PROMPTS[1])
    seq = engine.add_request(GenerationRequest("", 20, SamplingParams(temperature=0.0), prompt_ids=ids))
    for _ in range(6):
        engine.step()
    s = engine._seqs[seq]
    assert s.stats.draft_tokens > 0 and s.cache.length == len(s.tokens) - 1
    with torch.inference_mode():
        want = tiny.model(input_ids=torch.tensor([s.tokens])).logits[0, -1]
    got = engine.target.forward_batch([s.cache], [s.tokens[-1:]])[0][-1]
    assert torch.allclose(got, want, atol=1e-5)
    engine.target.rollback(s.cache, 1)
    engine.target.forward_batch([s.cache], [list(range(tiny.model.config.vocab_size, tiny.model.config.vocab_size + 3))])
    kept = engine.target.forward_batch([s.cache], [s.tokens[-1:]])[0][-1]
    assert not torch.allclose(kept, want, atol=1e-5)


def test_pass_samples_the_target_distribution(tiny, trained, monkeypatch):
    """Sampled requests draw drafts from the warped look-ahead rows (the q sent to rejection
    sampling): four tokens of "ab" follow the target's exact joint; accepting every draft (the
    negative control) does not."""
    import specserve.cluster.speculation.rejection as rejection
    from test_engine_sampling import PARAMS, _chi2_pvalue
    from test_head import _exact_joint

    engine = _engine(tiny, trained[0], 2)
    joint = _exact_joint(tiny, tiny.tokenizer.encode("ab"), PARAMS, 4)

    def samples(n: int) -> list[tuple[int, ...]]:
        params = [SamplingParams(PARAMS.temperature, PARAMS.top_k, PARAMS.top_p, seed=i) for i in range(n)]
        results = engine.generate([GenerationRequest("ab", 4, params[i], 2) for i in range(n)])
        assert sum(r.stats.draft_tokens for r in results) > n
        return [tuple(r.token_ids) for r in results]

    assert _chi2_pvalue(samples(3000), joint) > 1e-3
    monkeypatch.setattr(rejection, "acceptance_probs", lambda p_x, q_x: torch.ones_like(p_x))
    assert _chi2_pvalue(samples(3000), joint) < 1e-6


def test_a_seeded_sampled_request_reproduces_alone_and_in_a_batch(tiny, trained):
    engine = _engine(tiny, trained[0], 2)
    request = GenerationRequest("the cat", 24, SamplingParams(temperature=0.8, seed=7))
    alone = engine.generate([request])[0].token_ids
    batch = engine.generate([GenerationRequest(p, 24, SamplingParams(temperature=0.8, seed=i)) for i, p in
                             enumerate(TINY_PROMPTS)] + [request])[-1].token_ids
    assert alone == batch


def test_pass_config_and_errors(tiny, trained, tmp_path):
    from specserve.cluster.runtime.factory import make_engine

    base = {"target": {"model": "tiny-llama", "dtype": "float32", "chat_template": False}}
    config = parse_config(base | {"draft": {"drafter": "pass", "pass": {"embeddings": trained[0], "lookahead": 2}}})
    engine = make_engine(config, tiny)
    assert engine.lookahead == 2 and engine.drafter.capabilities.prior_alpha == trained[3]["agreement"][0]
    both = make_engine(parse_config(base | {"draft": {"drafter": "ngram_pass", "pass": {"embeddings": trained[0]}}}), tiny)
    assert both.lookahead == 3 and both.drafter.free_sources == {"lookup"}
    with pytest.raises(ValueError, match="draft.pass.lookahead"):
        make_engine(parse_config(base | {"draft": {"drafter": "pass", "pass": {"embeddings": trained[0],
                                                                                  "lookahead": 5}}}), tiny)
    with pytest.raises(ValueError, match="draft.pass.embeddings"):
        make_engine(parse_config(base | {"draft": {"drafter": "pass", "pass": {"embeddings": str(tmp_path / "no.pt")}}}), tiny)
    with pytest.raises(Exception, match="draft.pass.lookahead"):
        parse_config({"draft": {"pass": {"lookahead": 0}}})
    with pytest.raises(Exception, match="draft_replicas|beside|replica"):
        parse_config({"draft": {"drafter": "pass"}, "cluster": {"draft_replicas": 1}})


def test_lookup_then_pass_greedy_equals_plain_and_uses_both(tiny, trained):
    from specserve.cluster.runtime.drafters import NgramDrafter
    from specserve.cluster.runtime.lookup_pass import LookupThenPass

    la = LookaheadEmbeddings.load(trained[0], target_signature(tiny.model))
    drafter = LookupThenPass(NgramDrafter(max_n=3, min_n=2), PassDrafter(install(tiny.model, la)))
    engine = SpeculativeEngine(tiny.model, tiny.tokenizer, drafter, max_draft_tokens=6, prior_alpha=0.6,
                               cost_model=CostModel(0.0, tuple(1.0 + 0.01 * j for j in range(7))))
    prompts = [tiny.tokenizer.encode(p * 2) for p in TINY_PROMPTS]
    results = engine.generate([GenerationRequest("", 32, SamplingParams(temperature=0.0), prompt_ids=p) for p in prompts])
    eos = tiny.tokenizer.eos_token_id
    for ids, r in zip(prompts, results):
        assert r.token_ids == hf_greedy(tiny.model, ids, 32, eos)[: len(r.token_ids)]
    assert max(n for r in results for n in r.stats.rounds_k) > 3  # lookup drafted past L
    assert sum(r.stats.accepted_tokens for r in results) > 0


def test_train_lookahead_command(tmp_path, capsys):
    from specserve.cluster.cli import main
    from specserve.cluster.runtime.models import load_tokenizer

    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("\n".join(json.dumps(r) for r in local_records(load_tokenizer("tiny-llama"), 6_000)))
    config = tmp_path / "tiny.yaml"
    config.write_text("target: {model: tiny-llama, dtype: float32}\n")
    out = tmp_path / "la.pt"
    rc = main(["train-lookahead", "--config", str(config), "--corpus", str(corpus), "--out", str(out), "--window", "32",
               "--lookahead", "2", "--steps", "6", "--batch", "2", "--anchors", "4", "--eval-every", "3",
               "--eval-windows", "2", "--precision", "float32"])
    assert rc == 0 and out.is_file()
    report = json.loads(capsys.readouterr().out)
    assert len(report["per_position"]["agreement"]) == 2 and report["step_with_lookahead_block_s"] > 0
    assert main(["train-lookahead", "--config", str(config), "--corpus", str(corpus), "--out", str(out),
                 "--steps", "0"]) == 2
    assert "steps" in capsys.readouterr().err


@pytest.mark.smollm2
def test_greedy_with_pass_equals_plain_on_smollm2(smollm2_fp32, trained):
    """With the shipped look-ahead embeddings (float32, K = 3): token for token."""
    from specserve.cluster.heads import builtin_lookahead
    from specserve.cluster.runtime.factory import make_engine

    config = parse_config({"target": {"model": "smollm2-135m-instruct", "dtype": "float32"}, "draft": {"drafter": "pass"}})
    try:
        engine = make_engine(config, smollm2_fp32)
        prompts = ["Name three colours.", "Write a Python function that reverses a string."]
        results = assert_greedy_equals_plain_on_smollm2(engine, smollm2_fp32, prompts, 32, 3)
        assert sum(r.stats.accepted_tokens for r in results) > 0
        assert builtin_lookahead("smollm2-135m-instruct").stat().st_size < 100_000
    finally:
        uninstall(smollm2_fp32.model)


@pytest.mark.ray
def test_distributed_greedy_with_pass_equals_plain(ray_cluster, tiny, trained):
    """Tensor parallel 2: the look-ahead embeddings are installed on both ranks."""
    engine = tiny_distributed({"drafter": "pass", "pass": {"embeddings": trained[0]}}, 0, {"num_draft_tokens": 3})
    try:
        requests = [GenerationRequest(p, 32) for p in TINY_PROMPTS]
        got = engine.generate(requests)
        uninstall(tiny.model)
        eos = tiny.tokenizer.eos_token_id
        for r, res in zip(requests, got):
            assert res.token_ids == hf_greedy(tiny.model, tiny.tokenizer.encode(r.prompt), 32, eos)
        assert sum(r.stats.draft_tokens for r in got) > 50 and sum(r.stats.accepted_tokens for r in got) > 0
    finally:
        engine.shutdown()


@pytest.mark.ray
def test_served_greedy_with_pass_equals_plain(ray_cluster, trained):
    """Through Serve's gRPC API (configs/tiny.yaml: tensor parallel 2 behind the engine): PaSS
    rounds (the server's policy and K = 3) give plain decoding's tokens."""
    from conftest import served_tiny

    with served_tiny("pass-test", draft={"drafter": "pass", "pass": {"embeddings": trained[0]}},
                     cluster={"draft_replicas": 0}) as run:
        plain = [run(p, 0) for p in TINY_PROMPTS[:3]]
        for k in (3, None):
            got = [run(p, k) for p in TINY_PROMPTS[:3]]
            assert [list(r.token_ids) for r in got] == [list(r.token_ids) for r in plain]
        assert all(r.stats.draft_tokens == 0 for r in plain)
        assert sum(r.stats.draft_tokens for r in (run(p, 3) for p in TINY_PROMPTS[:3])) > 10


@pytest.mark.parametrize("slope, fused", [(0.002, True), (0.3, False)])
def test_pass_fuses_or_alternates_by_measured_cost(tiny, trained, slope, fused, monkeypatch):
    """Where verified tokens are nearly free, a round verifies its drafts and appends look-ahead
    blocks at every accept point (fused); where each costs 30% of a step, rounds alternate as in the
    paper (a call that drafts, then a call that verifies); greedy output is plain's either way."""
    cost = CostModel(0.0, tuple(1.0 + slope * j for j in range(7)))
    engine = _engine(tiny, trained[0], 2, cost)
    seen = []
    import specserve.cluster.runtime.engine as engine_module

    ids_of = engine_module.lookahead_ids  # the look-ahead tokens each verified block asks for
    monkeypatch.setattr(engine_module, "lookahead_ids",
                        lambda block, vocab: seen.append((len(block), block.lookahead)) or ids_of(block, vocab))
    prompts = [tiny.tokenizer.encode(p) for p in TINY_PROMPTS[:3]]
    results = engine.generate([GenerationRequest("", 24, SamplingParams(temperature=0.0), prompt_ids=p) for p in prompts])
    eos = tiny.tokenizer.eos_token_id
    for ids, r in zip(prompts, results):
        assert r.token_ids == hf_greedy(tiny.model, ids, 24, eos)[: len(r.token_ids)]
    both = sum(1 for k, n in seen if k and n)  # rounds that verify drafts and draft again
    drafting_only = sum(1 for k, n in seen if not k and n)
    verifying_only = sum(1 for k, n in seen if k and not n)
    if fused:
        assert both > 10 and verifying_only == 0
    else:
        assert both == 0 and drafting_only > 10 and verifying_only > 10


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_pass_drafts_read_the_host_once_a_round(tiny, trained, monkeypatch, temperature):
    """The look-ahead rows stay on the target's device: a round's PaSS drafts (greedy argmax ids, or
    tokens drawn from the warped rows) reach the host in one read, whatever the batch."""
    from test_core_device import host_reads

    reads = {}
    for batch in (1, 6):
        engine = _engine(tiny, trained[0], 3)
        original = engine.drafter.propose_many

        def counted(requests, _original=original, _batch=batch):
            with host_reads() as calls:
                out = _original(requests)
            if any(len(b) for b in out):
                reads.setdefault(_batch, []).append(len(calls))
            return out
        monkeypatch.setattr(engine.drafter, "propose_many", counted)
        engine.generate([GenerationRequest(TINY_PROMPTS[i % len(TINY_PROMPTS)], 10,
                                           SamplingParams(temperature=temperature, seed=i)) for i in range(batch)])
    assert reads[1] and reads[6] and max(reads[1]) == max(reads[6]) == 1, reads
