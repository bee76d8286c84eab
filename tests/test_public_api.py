"""`import specserve`: the small public API, resolved lazily."""

import subprocess
import sys

import pytest


def test_the_public_names_are_the_engine_types_the_client_and_build_app():
    import specserve
    from specserve.cluster.app import build_app
    from specserve.cluster.client import Client
    from specserve.cluster.runtime.engine import GenerationRequest, SpeculativeEngine
    from specserve.cluster.speculation import SamplingParams

    assert specserve.SpeculativeEngine is SpeculativeEngine and specserve.GenerationRequest is GenerationRequest
    assert specserve.SamplingParams is SamplingParams and specserve.Client is Client and specserve.build_app is build_app
    assert set(specserve.__all__) <= set(dir(specserve))
    with pytest.raises(AttributeError, match="no attribute 'CausalLM'"):
        specserve.CausalLM  # noqa: B018 - private plumbing stays private


def test_importing_specserve_loads_neither_torch_nor_ray():
    code = "import sys, specserve, specserve.v1.generation_pb2; print(sorted(m for m in ('torch', 'ray') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stderr


def test_the_documented_example_runs(tiny_llama):
    import specserve

    engine = specserve.build_engine(specserve.load_config("configs/tiny.yaml"))
    result = engine.generate([specserve.GenerationRequest("Hello", 8, specserve.SamplingParams(temperature=0.0))])[0]
    assert len(result.token_ids) > 0 and result.finish_reason in ("length", "eos")
