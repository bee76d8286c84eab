import pytest
import torch

from specserve.cluster.runtime.drafters import NgramDrafter
from specserve.cluster.runtime.model_drafter import ModelDrafter
from specserve.cluster.runtime.engine import SpeculativeEngine
from specserve.cluster.runtime.factory import check_same_vocabulary
from specserve.cluster.runtime.models import LoadedModel, layer_subset, tiny_config
from specserve.cluster.runtime.tokenizer import ByteTokenizer
from specserve.cluster.speculation import SamplingParams


def test_ngram_proposes_what_followed_the_latest_match():
    d = NgramDrafter(max_n=3, min_n=1)
    assert d.lookup([1, 2, 3, 4, 5, 9, 1, 2, 3], 2) == [4, 5]
    assert d.lookup([1, 2, 3, 4, 1, 2, 3, 7, 1, 2, 3], 3) == [7, 1, 2]  # the latest match wins
    assert d.lookup([5, 6, 7, 8, 6], 4) == [7, 8, 6]  # falls back to n = 1, cut at the end
    assert d.lookup([1, 2, 3, 4], 3) == []  # no earlier occurrence
    assert d.lookup([1, 2, 1], 0) == []
    assert NgramDrafter(max_n=2, min_n=2).lookup([5, 6, 7, 8, 6], 4) == []


def test_ngram_block_is_one_hot():
    block = NgramDrafter().propose(0, [1, 2, 1], 2, SamplingParams(1.0), seed=0)
    assert block.token_ids == [2, 1] and block.probs is None


def test_ngram_rejects_bad_sizes():
    with pytest.raises(ValueError, match="min_n"):
        NgramDrafter(max_n=1, min_n=2)


def test_layer_subset_keeps_weights_and_renumbers(tiny_llama):
    draft = layer_subset(tiny_llama.model, [0, 3])
    assert draft.config.num_hidden_layers == 2 and tiny_llama.model.config.num_hidden_layers == 4
    assert [layer.self_attn.layer_idx for layer in draft.model.layers] == [0, 1]
    assert torch.equal(draft.model.layers[1].mlp.up_proj.weight, tiny_llama.model.model.layers[3].mlp.up_proj.weight)
    assert len(tiny_llama.model.model.layers) == 4  # the target is untouched
    for bad in ([], [3, 0], [0, 0], [4]):
        with pytest.raises(ValueError, match="draft.layers"):
            layer_subset(tiny_llama.model, bad)


def test_vocabulary_mismatch_is_an_error_at_start_up(tiny_llama):
    from transformers import AutoModelForCausalLM

    cfg = tiny_config("tiny-llama")
    cfg.vocab_size = 300
    other = AutoModelForCausalLM.from_config(cfg)
    with pytest.raises(ValueError, match="vocabulary"):
        SpeculativeEngine(tiny_llama.model, tiny_llama.tokenizer, ModelDrafter(other))


def test_tokenizer_mismatch_is_an_error(tiny_llama):
    class Shifted(ByteTokenizer):
        def vocab(self):
            return {k: (v + 1) % 258 for k, v in super().vocab().items()}

    with pytest.raises(ValueError, match="different vocabulary"):
        check_same_vocabulary("tiny-llama", tiny_llama.tokenizer, LoadedModel(tiny_llama.model, Shifted(), "shifted"))


def _record_loads(monkeypatch, *modules) -> list[str]:
    """The names of the models load_model loads from now on, through any of `modules`."""
    from specserve.cluster.runtime import models

    loaded, real = [], models.load_model

    def recording(name, *args, **kwargs):
        loaded.append(name)
        return real(name, *args, **kwargs)

    for module in modules:
        monkeypatch.setattr(module, "load_model", recording)
    return loaded


def test_a_draft_replica_with_a_separate_draft_model_never_loads_the_target(monkeypatch):
    """The draft is its own model (tiny-qwen2 shares tiny-llama's byte vocabulary): the replica loads
    the target's tokenizer to check the vocabulary, never the target's weights. A layer-subset
    draft, made from the target, does load them."""
    from specserve.actors.draft_replica import DraftHost
    from specserve.cluster.runtime import factory

    loaded = _record_loads(monkeypatch, factory)
    separate = {"target": {"model": "tiny-llama", "dtype": "float32"},
                "draft": {"drafter": "model", "model": {"name": "tiny-qwen2"}}}
    host = DraftHost(separate)
    try:
        assert loaded == ["tiny-qwen2"] and isinstance(host.drafter, ModelDrafter)
    finally:
        host.stop()
    subset = {"target": {"model": "tiny-llama", "dtype": "float32"}, "draft": {"drafter": "model", "model": {"layers": [0, 1]}}}
    host = DraftHost(subset)
    host.stop()
    assert loaded == ["tiny-qwen2", "tiny-llama"]


def test_the_roles_of_a_round_are_typed_protocols(tiny_llama):
    """The in-process target and every drafter kind fill the core's Target and Drafter protocols."""
    from specserve.actors.draft_pool import DraftPool
    from specserve.actors.remote_drafter import RemoteDrafter
    from specserve.cluster.runtime.kv import CausalLM
    from specserve.cluster.speculation import Drafter as DrafterRole
    from specserve.cluster.speculation import DraftRequest, Target

    assert isinstance(CausalLM(tiny_llama.model), Target)
    for drafter in (NgramDrafter(), ModelDrafter(tiny_llama.model)):
        assert isinstance(drafter, DrafterRole)
    pool = DraftPool([], timeout_s=1)  # no replica: blocks are empty (K = 0)
    assert isinstance(pool, DrafterRole) and isinstance(RemoteDrafter("127.0.0.1:1"), DrafterRole)
    pool.close()
    blocks = NgramDrafter().propose_many([DraftRequest(0, [1, 2, 1], 2, SamplingParams(0.0), 0)])
    assert blocks[0].token_ids == [2, 1] and blocks[0].parents is None  # a chain


@pytest.mark.ray
def test_a_coordinator_shares_the_target_with_a_drafter_made_from_it(ray_cluster, monkeypatch):
    """tp_size 1, drafter in the coordinator: a layer-subset draft is cut from the target rank 0
    already holds; the target's weights load once."""
    import asyncio

    from specserve.actors.coordinator import Coordinator
    from specserve.cluster.runtime import factory, models
    from specserve.cluster.runtime.engine import GenerationRequest as Request
    from specserve.cluster.speculation import SamplingParams

    loaded = _record_loads(monkeypatch, models, factory)
    coordinator = Coordinator({"target": {"model": "tiny-llama", "dtype": "float32", "chat_template": False},
                               "draft": {"drafter": "model", "model": {"layers": [0, 1]}},
                               "speculation": {"num_draft_tokens": 3}, "cluster": {"draft_replicas": 0}})
    try:
        result = asyncio.run(coordinator.generate(Request("abcabcabc", 8, SamplingParams(temperature=0.0))))
    finally:
        asyncio.run(coordinator.shutdown())
    assert loaded == ["tiny-llama"] and result.stats.draft_tokens > 0
