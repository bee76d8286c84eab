"""Bad input gets a clear error naming the field, through the engine and the CLI; the CLI's JSON."""

import json

import pytest

from specserve.cluster.cli import main
from specserve.cluster.runtime.engine import GenerationRequest
from specserve.cluster.runtime.factory import build_engine, make_engine
from specserve.cluster.speculation import InvalidRequest, SamplingParams
from conftest import tiny_config

TINY = "configs/tiny.yaml"


@pytest.fixture(scope="module")
def engine(tiny_llama):
    return make_engine(tiny_config(max_k=6), tiny_llama)


@pytest.mark.parametrize(
    "make,field",
    [
        (lambda: GenerationRequest(""), "prompt"),
        (lambda: GenerationRequest("x" * 5000), "prompt"),
        (lambda: GenerationRequest("hi", max_new_tokens=0), "max_new_tokens"),
        (lambda: GenerationRequest("hi", max_new_tokens=-3), "max_new_tokens"),
        (lambda: GenerationRequest("hi", num_draft_tokens=7), "num_draft_tokens"),
        (lambda: GenerationRequest("hi", num_draft_tokens=-1), "num_draft_tokens"),
        (lambda: GenerationRequest("hi", stop=("",)), "stop"),
        (lambda: GenerationRequest("hi", sampling=SamplingParams(temperature=-0.5)), "temperature"),
        (lambda: GenerationRequest("hi", sampling=SamplingParams(top_p=0.0)), "top_p"),
        (lambda: GenerationRequest("hi", sampling=SamplingParams(top_p=1.01)), "top_p"),
        (lambda: GenerationRequest("hi", sampling=SamplingParams(top_k=-1)), "top_k"),
        (lambda: GenerationRequest("hi", max_new_tokens=4_294_967_295), "max_new_tokens"),  # above the context
    ],
)
def test_engine_rejects_bad_fields(engine, make, field):
    with pytest.raises(InvalidRequest) as err:
        engine.add_request(make())
    assert err.value.field == field
    assert not engine.has_unfinished()  # nothing half-added


def test_limits_cap_prompts_in_the_engine_and_everything_else_at_the_boundary(tiny_llama):
    from specserve.cluster.api import check_limits
    from specserve.cluster.config import ConfigError, parse_config

    config = tiny_config()
    config = config.model_copy(update={"serve": config.serve.model_copy(update={
        "limits": config.serve.limits.model_copy(update={"max_prompt_tokens": 8, "max_new_tokens": 50,
                                                         "max_stop_strings": 2, "max_stop_chars": 4})})})
    capped = make_engine(config, tiny_llama)
    with pytest.raises(InvalidRequest, match=r"over the limit serve.limits.max_prompt_tokens \(8\)") as err:
        capped.add_request(GenerationRequest("nine char", 4))
    assert err.value.field == "prompt"
    assert capped.generate([GenerationRequest("eight ch", 2)])[0].prompt_tokens == 8
    limits = config.serve.limits
    for request, field, cap in ((GenerationRequest("x", 51), "max_tokens", "max_new_tokens"),
                                (GenerationRequest("x", 5, stop=("a", "b", "c")), "stop", "max_stop_strings"),
                                (GenerationRequest("x", 5, stop=("abcde",)), "stop", "max_stop_chars")):
        with pytest.raises(InvalidRequest, match=f"serve.limits.{cap}") as err:
            check_limits(request, limits, "max_tokens")
        assert err.value.field == field
    check_limits(GenerationRequest("x", 50, stop=("abcd", "b")), limits)
    with pytest.raises(ConfigError, match="exceeds serve.limits.max_new_tokens"):
        parse_config({"serve": {"max_new_tokens": 100, "limits": {"max_new_tokens": 50}}})


def test_a_bad_request_in_a_batch_adds_nothing(engine):
    good = GenerationRequest("hello", 4)
    with pytest.raises(InvalidRequest):
        engine.generate([good, GenerationRequest("hello", 0), good])
    assert not engine.has_unfinished()
    assert len(engine.generate([good])) == 1


def test_unknown_drafter_is_named():
    from specserve.cluster.config import load_config

    with pytest.raises(InvalidRequest) as err:
        build_engine(load_config(TINY), drafter="medusa")
    assert err.value.field == "drafter" and "medusa" in str(err.value)


@pytest.mark.parametrize(
    "args,field",
    [
        (["--prompt", ""], "prompt"),
        (["--prompt", "x" * 5000], "prompt"),
        (["--prompt", "hi", "--max-new-tokens", "0"], "max_new_tokens"),
        (["--prompt", "hi", "--temperature", "-1"], "temperature"),
        (["--prompt", "hi", "--top-p", "0"], "top_p"),
        (["--prompt", "hi", "--top-p", "1.5"], "top_p"),
        (["--prompt", "hi", "--top-k", "-2"], "top_k"),
        (["--prompt", "hi", "--drafter", "medusa"], "drafter"),
        (["--prompt", "hi", "--num-draft-tokens", "99"], "num_draft_tokens"),
    ],
)
def test_cli_rejects_bad_fields(capsys, args, field):
    assert main(["generate", "--config", TINY, *args]) == 2
    err = capsys.readouterr().err
    assert f"invalid {field}:" in err


def test_cli_bad_config_names_the_key(capsys, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("target:\n  model: tiny-llama\n  colour: blue\n")
    assert main(["generate", "--config", str(bad), "--prompt", "hi"]) == 2
    assert "target.colour: unknown key" in capsys.readouterr().err


def _cli_json(capsys, *args):
    assert main(["generate", "--config", TINY, "--json", *args]) == 0
    return json.loads(capsys.readouterr().out)


def test_cli_json_and_plain_decoding(capsys):
    spec = _cli_json(capsys, "--prompt", "abcabcabc", "--max-new-tokens", "24", "--num-draft-tokens", "4")
    assert set(spec) >= {"text", "token_ids", "finish_reason", "stats"}
    assert set(spec["stats"]) >= {"target_calls", "draft_tokens", "accepted_tokens"}
    assert spec["finish_reason"] in ("length", "eos") and spec["stats"]["draft_tokens"] > 0
    plain = _cli_json(capsys, "--prompt", "abcabcabc", "--max-new-tokens", "24", "--num-draft-tokens", "0")
    assert plain["stats"]["draft_tokens"] == 0
    assert plain["stats"]["target_calls"] == len(plain["token_ids"]) + (plain["finish_reason"] == "eos")
    assert plain["token_ids"] == spec["token_ids"] and plain["text"] == spec["text"]
    # a seed fixes the sample for a given K (adaptive K follows measured step costs: pin it)
    seeded = ("--prompt", "abc", "--max-new-tokens", "16", "--temperature", "0.8", "--top-k", "50", "--top-p", "0.9",
              "--seed", "5", "--drafter", "ngram", "--num-draft-tokens", "3")
    sampled, again = _cli_json(capsys, *seeded), _cli_json(capsys, *seeded)
    assert sampled["token_ids"] == again["token_ids"]


def test_finish_reasons(engine, tiny_llama):
    plain = engine.generate([GenerationRequest("abcabc", 30, num_draft_tokens=0)])[0]
    assert plain.finish_reason == "length" and len(plain.token_ids) == 30
    stop = plain.text[5:8]
    stopped = engine.generate([GenerationRequest("abcabc", 30, stop=(stop,), num_draft_tokens=3)])[0]
    assert stopped.finish_reason == "stop" and stopped.text == plain.text[: plain.text.find(stop)]


def test_eos_ends_the_sequence_and_is_not_returned(engine, tiny_llama):
    import copy

    from specserve.cluster.runtime.models import LoadedModel

    plain = engine.generate([GenerationRequest("abcabc", 30, num_draft_tokens=0)])[0]
    model = copy.deepcopy(tiny_llama.model)
    eos = tiny_llama.tokenizer.eos_token_id
    head = model.lm_head.weight.data
    head[eos] = 2 * head[plain.token_ids[2]]  # EOS now outscores the third token wherever it leads
    eos_engine = make_engine(tiny_config(), LoadedModel(model, tiny_llama.tokenizer, "tiny-llama"))
    for k in (0, 3, None):
        r = eos_engine.generate([GenerationRequest("abcabc", 30, num_draft_tokens=k)])[0]
        assert r.finish_reason == "eos" and eos not in r.token_ids
        assert len(r.token_ids) <= 2 and r.token_ids == plain.token_ids[: len(r.token_ids)]


def test_text_that_is_not_unicode_is_named(engine):
    from specserve.cluster.runtime.engine import ChatMessage

    for request, field in ((GenerationRequest("a\ud800b", 2), "prompt"), (GenerationRequest("ok", 2, stop=("\udfff",)), "stop"),
                           (GenerationRequest("", 2, messages=(ChatMessage("user", "\ud800"),)), "messages[0].content")):
        with pytest.raises(InvalidRequest, match="not valid Unicode") as err:
            engine.add_request(request)
        assert err.value.field == field
