"""dtype `auto`: bfloat16 where the hardware computes it natively, float32 elsewhere."""

import torch

from cluster.runtime.models import choose_dtype, cpu_flags, load_model

CPU, GPU = torch.device("cpu"), torch.device("cuda")
AVX2 = frozenset({"sse4_2", "avx", "avx2", "fma"})


def test_auto_is_float32_on_a_cpu_without_native_bf16():
    assert choose_dtype("auto", CPU, AVX2) == "float32"
    assert choose_dtype("auto", CPU, AVX2 | {"avx512f", "avx512bw"}) == "float32"  # AVX-512 alone is not bf16


def test_auto_is_bfloat16_with_avx512_bf16_or_amx_and_on_gpus():
    assert choose_dtype("auto", CPU, AVX2 | {"avx512f", "avx512_bf16"}) == "bfloat16"
    assert choose_dtype("auto", CPU, AVX2 | {"amx_bf16", "amx_tile"}) == "bfloat16"
    assert choose_dtype("auto", GPU, frozenset()) == "bfloat16"


def test_an_explicit_dtype_is_kept():
    for dtype in ("float32", "bfloat16"):
        assert choose_dtype(dtype, CPU, AVX2) == dtype
        assert choose_dtype(dtype, GPU, AVX2) == dtype


def test_this_machine_and_the_loaded_weights_agree():
    want = "bfloat16" if cpu_flags() & {"avx512_bf16", "amx_bf16"} else "float32"
    loaded = load_model("tiny-llama", "auto", "cpu")
    assert loaded.dtype == want == choose_dtype("auto", CPU)
    assert next(loaded.model.parameters()).dtype == getattr(torch, want)
