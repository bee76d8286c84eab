"""Drafter `trained`: a standalone draft model distilled for the target (specserve train-draft model),
trained, saved, reloaded and drafting exactly in process, on a draft replica and on SmolLM2."""

import json

import pytest
import torch

from specserve.cluster.cli import main
from specserve.cluster.config import parse_config
from specserve.cluster.runtime.model_drafter import ModelDrafter
from specserve.cluster.runtime.engine import GenerationRequest
from specserve.cluster.runtime.factory import make_engine
from specserve.cluster.runtime.models import DRAFT_META, load_trained_draft
from specserve.cluster.speculation import SamplingParams
from specserve.cluster.training.features import cut_windows, extract_features
from specserve.cluster.training.train_model import ModelTraining, draft_from_target, save_draft, train_model
from conftest import TINY_PROMPTS, assert_greedy_equals_plain_on_smollm2, hf_greedy, local_records, tiny_distributed

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_draft(tiny_llama, tmp_path_factory):
    """A 2-layer draft distilled briefly from the tiny target, saved as a folder, and the training log."""
    data = extract_features(tiny_llama.model, cut_windows(local_records(tiny_llama.tokenizer), 64), progress=False)
    path = str(tmp_path_factory.mktemp("draft") / "draft")
    cfg = ModelTraining(layers=2, steps=120, batch=8, lr=2e-3, eval_every=40, eval_windows=16, warmup=10,
                        precision="float32")
    draft, log = train_model(tiny_llama.model, tiny_llama.tokenizer, data, cfg, path, progress=False)
    return path, draft, log, data


def _config(path, k="adaptive", **cluster):
    return parse_config({"target": {"model": "tiny-llama", "dtype": "float32", "chat_template": False},
                         "draft": {"drafter": "trained", "trained": {"path": path}},
                         "speculation": {"num_draft_tokens": k, "max_draft_tokens": 6}, "cluster": cluster})


def test_training_lowers_held_out_loss_and_the_folder_reloads(tiny_llama, tiny_draft):
    path, draft, log, data = tiny_draft
    assert log.eval_loss[-1] < 0.9 * log.eval_loss[0], log.eval_loss
    assert log.agreement[-1] > log.agreement[0], log.agreement
    assert draft.config.num_hidden_layers == 2
    assert not draft.get_input_embeddings().weight.requires_grad  # the target's embedding, frozen
    loaded = load_trained_draft(path, "tiny-llama")
    ids = data["tokens"][:2].long()
    with torch.inference_mode():
        assert torch.equal(loaded(input_ids=ids).logits, draft(input_ids=ids).logits)
    meta = json.loads(open(f"{path}/{DRAFT_META}").read())
    assert meta["log"]["eval_loss"] == log.eval_loss and meta["training"]["layers"] == 2


def test_a_folder_that_is_not_a_draft_for_this_target_is_refused(tiny_draft, tmp_path):
    with pytest.raises(ValueError, match="draft.trained.path: .* is not a draft"):
        load_trained_draft(str(tmp_path), "tiny-llama")
    meta = json.loads(open(f"{tiny_draft[0]}/{DRAFT_META}").read())
    meta["signature"]["vocab_size"] = 1000
    (tmp_path / DRAFT_META).write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="draft.trained.path: .*vocab_size 1000.*258"):
        load_trained_draft(str(tmp_path), "tiny-llama")
    with pytest.raises(ValueError, match="draft.trained.path"):
        parse_config({"target": {"model": "tiny-llama"}, "draft": {"drafter": "trained"}})


@pytest.mark.parametrize("k", [3, "adaptive"])
def test_greedy_with_the_trained_draft_equals_plain_greedy(tiny_llama, tiny_draft, k):
    engine = make_engine(_config(tiny_draft[0], k), tiny_llama)
    assert isinstance(engine.drafter, ModelDrafter)
    prompts = [tiny_llama.tokenizer.encode(p) for p in TINY_PROMPTS]
    results = engine.generate([GenerationRequest("", 40, SamplingParams(temperature=0.0), prompt_ids=p) for p in prompts])
    eos = tiny_llama.tokenizer.eos_token_id
    for ids, r in zip(prompts, results):
        assert r.token_ids == hf_greedy(tiny_llama.model, ids, 40, eos)[: len(r.token_ids)]
    if k != "adaptive":
        assert sum(r.stats.accepted_tokens for r in results) > 0


def test_train_draft_model_command(tiny_draft, tmp_path, capsys):
    """train-draft model end to end from a corpus file; a head's setting is refused, naming it."""
    corpus = tmp_path / "c.jsonl"
    from conftest import local_records as records
    from specserve.cluster.runtime.models import load_tokenizer

    with open(corpus, "w") as f:
        for r in records(load_tokenizer("tiny-llama"), 8000):
            f.write(json.dumps({"source": "stdlib", "ids": r["ids"]}) + "\n")
    out = tmp_path / "draft"
    argv = ["train-draft", "model", "--corpus", str(corpus), "--out", str(out), "--config", "configs/tiny.yaml",
            "--window", "64", "--steps", "12", "--eval-every", "6", "--layers", "1", "--plot", str(tmp_path / "p.png")]
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["kind"] == "model" and report["draft_step_s"] > 0 and 0 <= report["greedy_agreement"] <= 1
    assert load_trained_draft(str(out), "tiny-llama").config.num_hidden_layers == 1
    assert (tmp_path / "p.png").stat().st_size > 0
    assert main(argv[:-2] + ["--vocab", "100"]) == 2
    assert "vocab: is not a setting of train-draft model" in capsys.readouterr().err
    assert main(argv[:8] + ["--layers", "9"]) == 2
    assert "layers must be in [1, 4]" in capsys.readouterr().err


@pytest.mark.ray
def test_distributed_greedy_with_the_trained_draft_on_a_draft_replica(ray_cluster, tiny_llama, tiny_draft):
    """The trained draft runs on a draft replica (it needs nothing of the target) behind tensor parallel 2."""
    engine = tiny_distributed({"drafter": "trained", "trained": {"path": tiny_draft[0]}}, 1, {"num_draft_tokens": 3})
    try:
        requests = [GenerationRequest(p, 24) for p in TINY_PROMPTS[:4]]
        got = engine.generate(requests)
        eos = tiny_llama.tokenizer.eos_token_id
        for r, res in zip(requests, got):
            assert res.token_ids == hf_greedy(tiny_llama.model, tiny_llama.tokenizer.encode(r.prompt), 24, eos)
        assert sum(r.stats.accepted_tokens for r in got) > 0
        assert engine.stats()["draft_blocks"]  # the replica drafted
    finally:
        engine.shutdown()


@pytest.mark.smollm2
def test_greedy_with_a_trained_draft_equals_plain_on_smollm2(smollm2_fp32, tmp_path):
    """SmolLM2 in float32 with a 2-layer draft cut from it and saved by train-draft's writer (any
    draft is exact; this checks the folder round trip with a real tokenizer)."""
    draft = draft_from_target(smollm2_fp32.model, 2)
    save_draft(draft, smollm2_fp32.model, smollm2_fp32.tokenizer, tmp_path / "d", {})
    assert (tmp_path / "d" / "tokenizer.json").is_file()
    config = parse_config({"target": {"model": "smollm2-135m-instruct", "dtype": "float32"},
                           "draft": {"drafter": "trained", "trained": {"path": str(tmp_path / "d")}},
                           "speculation": {"num_draft_tokens": 3}})
    prompts = ["Explain why the sky is blue.", "Write a Python function that adds two numbers."]
    assert_greedy_equals_plain_on_smollm2(make_engine(config, smollm2_fp32), smollm2_fp32, prompts, 24, 3)
