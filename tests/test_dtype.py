"""dtype `auto`: measured per model on a CPU (runtime/formats.py), bfloat16 on GPUs; the flag rule
where no model is named; float32 through oneDNN as one of the measured formats."""

import json

import pytest
import torch

from specserve.cluster.runtime import formats
from specserve.cluster.runtime.formats import Format, cached_choice, pick, resolve
from specserve.cluster.runtime.models import choose_dtype, load_model
from specserve.cluster.runtime.onednn import OneDnnLinear, is_onednn, to_onednn

CPU, GPU = torch.device("cpu"), torch.device("cuda")
AVX2 = frozenset({"sse4_2", "avx", "avx2", "fma"})


def test_the_flag_rule_without_a_model():
    assert choose_dtype("auto", CPU, AVX2) == "float32"
    assert choose_dtype("auto", CPU, AVX2 | {"avx512f", "avx512bw"}) == "float32"  # AVX-512 alone is not bf16
    assert choose_dtype("auto", CPU, AVX2 | {"avx512f", "avx512_bf16"}) == "bfloat16"
    assert choose_dtype("auto", CPU, AVX2 | {"amx_bf16", "amx_tile"}) == "bfloat16"
    assert choose_dtype("auto", GPU, frozenset()) == "bfloat16"
    assert resolve("auto", CPU).dtype == choose_dtype("auto", CPU)


def test_an_explicit_dtype_is_kept_and_auto_on_a_gpu_is_bfloat16():
    for dtype in ("float32", "bfloat16"):
        assert resolve(dtype, CPU, "tiny-llama").dtype == dtype
        assert choose_dtype(dtype, GPU, AVX2) == dtype
    assert resolve("float32", CPU, "tiny-llama").kernel == "mkl"
    assert resolve("auto", GPU, "tiny-llama") == Format("bfloat16", "cuda", "auto on a GPU")


def _costs(**ms):
    return {name.replace("_", "/", 1): {"1x1": v / 1e3, "1x5": v / 1e3} for name, v in ms.items()}


def _never():
    raise AssertionError("quality is measured only when int8 is the fastest")


def test_pick_takes_the_fastest_and_measures_quality_only_for_int8():
    got = pick(_costs(float32_mkl=30, float32_onednn=20, bfloat16_native=25, int8_fbgemm=40), _never)
    assert (got.dtype, got.kernel) == ("float32", "onednn")
    assert "float32/onednn 20.0" in got.reason and got.reason.index("float32/onednn") < got.reason.index("int8/fbgemm")


def test_pick_takes_int8_within_the_quality_goal():
    got = pick(_costs(float32_mkl=30, int8_fbgemm=10), lambda: {"float32": 9.6, "int8": 9.7, "ratio": 9.7 / 9.6})
    assert (got.dtype, got.kernel) == ("int8", "fbgemm") and "within 2%" in got.reason


def test_pick_keeps_the_fastest_other_format_when_int8_misses_the_goal():
    got = pick(_costs(float32_mkl=30, bfloat16_native=25, int8_fbgemm=10, int8_int_mm=12),
               lambda: {"float32": 13.55, "int8": 14.44, "ratio": 14.44 / 13.55})
    assert (got.dtype, got.kernel) == ("bfloat16", "native")
    assert "misses the 2% goal: kept bfloat16/native" in got.reason and "+6.6%" in got.reason


def test_pick_without_any_format_is_an_error():
    with pytest.raises(RuntimeError, match="no weight format"):
        pick({}, _never)


def test_the_choice_is_measured_once_and_cached_per_model(tmp_path, monkeypatch):
    monkeypatch.setenv("SPECSERVE_CACHE", str(tmp_path))
    calls = []

    def measure(model):
        calls.append(model)
        return Format("int8", "fbgemm", f"measured {model}")

    assert cached_choice("tiny-llama", measure) == Format("int8", "fbgemm", "measured tiny-llama")
    assert cached_choice("tiny-llama", measure) == Format("int8", "fbgemm", "measured tiny-llama")
    assert cached_choice("tiny-qwen2", measure).reason == "measured tiny-qwen2"
    assert calls == ["tiny-llama", "tiny-qwen2"]
    saved = [json.loads(p.read_text()) for p in (tmp_path / "formats").iterdir()]
    assert sorted(s["model"] for s in saved) == ["tiny-llama", "tiny-qwen2"]


def test_auto_measures_every_candidate_and_loads_the_chosen_format(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SPECSERVE_CACHE", str(tmp_path))
    seen = {}
    real_pick = formats.pick

    def spy(costs, quality):
        seen.update(costs)
        return real_pick(costs, lambda: {"float32": 1.0, "int8": 1.0, "ratio": 1.0})

    monkeypatch.setattr(formats, "pick", spy)
    loaded = load_model("tiny-llama", "auto", "cpu")
    assert set(seen) == {f"{d}/{k}" for d, k in formats.candidates()}
    assert all(set(t) == {f"{b}x{n}" for b, n in formats.SHAPES} and min(t.values()) > 0 for t in seen.values())
    fmt = loaded.format
    assert loaded.dtype == fmt.dtype and fmt.reason.startswith("measured here")
    assert f"dtype auto for tiny-llama: {fmt.dtype} ({fmt.kernel})" in capsys.readouterr().err
    weights = {p.dtype for p in loaded.model.parameters()}
    assert weights == {torch.float32} if fmt.dtype in ("float32", "int8") else {torch.bfloat16}
    assert is_onednn(loaded.model) == (fmt.kernel == "onednn")
    again = load_model("tiny-llama", "auto", "cpu")  # from the cache: measured once
    assert again.format == fmt and "as measured before" in capsys.readouterr().err


def test_onednn_linear_computes_the_float32_linear():
    gen = torch.Generator().manual_seed(0)
    linear = torch.nn.Linear(48, 80)
    x = torch.randn(3, 5, 48, generator=gen)
    got = OneDnnLinear(linear)(x)
    assert got.shape == (3, 5, 80) and got.dtype == torch.float32
    torch.testing.assert_close(got, linear(x), rtol=1e-5, atol=1e-5)
    assert OneDnnLinear(linear).weight is linear.weight  # shared, not copied


def test_onednn_float32_greedy_speculation_equals_plain():
    from specserve.cluster.runtime.engine import GenerationRequest
    from specserve.cluster.runtime.factory import make_engine
    from conftest import TINY_PROMPTS, tiny_config

    loaded = load_model("tiny-llama", "float32", "cpu")
    to_onednn(loaded.model)
    assert is_onednn(loaded.model)
    engine = make_engine(tiny_config(model="tiny-llama", drafter="model", layers=(0, 1, 3)), loaded)
    plain = engine.generate([GenerationRequest(p, 20, num_draft_tokens=0) for p in TINY_PROMPTS])
    ks = [(1, 3, None, 4)[i % 4] for i in range(len(TINY_PROMPTS))]
    spec = engine.generate([GenerationRequest(p, 20, num_draft_tokens=k) for p, k in zip(TINY_PROMPTS, ks)])
    assert [s.token_ids for s in spec] == [r.token_ids for r in plain]
    assert sum(s.stats.accepted_tokens for s in spec) > 0
