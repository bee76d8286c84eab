"""The public API's conversions (no server): proto and OpenAI JSON to requests, and the text
deltas of a stream, whose concatenation must be the final text exactly."""

import pytest
from specserve.v1 import generation_pb2 as pb

from specserve.cluster.api import TextStream, request_from_json, request_from_proto
from specserve.cluster.app import config_from_args
from specserve.cluster.config import ConfigError, load_config
from specserve.cluster.speculation import InvalidRequest


def test_proto_defaults_mean_no_truncation_and_the_servers_policy():
    r = request_from_proto(pb.GenerateRequest(prompt="hi"), default_max_new_tokens=77)
    assert r.max_new_tokens == 77 and r.num_draft_tokens is None
    assert r.sampling.greedy and r.sampling.top_k == 0 and r.sampling.top_p == 1.0 and r.sampling.seed is None
    r = request_from_proto(pb.GenerateRequest(prompt="hi", max_new_tokens=5, temperature=0.5, top_p=0.9, top_k=4,
                                              seed=0, num_draft_tokens=0, stop=["\n"]), 77)
    assert (r.max_new_tokens, r.num_draft_tokens, r.stop) == (5, 0, ("\n",))
    assert r.sampling.seed == 0 and r.sampling.top_k == 4 and abs(r.sampling.top_p - 0.9) < 1e-6


@pytest.mark.parametrize("fields,name", [
    ({"temperature": -0.5}, "temperature"), ({"temperature": float("inf")}, "temperature"),
    ({"top_p": 1.5}, "top_p"), ({"seed": 2**63}, "seed"),
])
def test_proto_bad_fields_name_themselves(fields, name):
    with pytest.raises(InvalidRequest) as e:
        request_from_proto(pb.GenerateRequest(prompt="hi", **fields), 8)
    assert e.value.field == name


def test_openai_json_defaults_and_fields():
    r, stream = request_from_json({"prompt": "hi", "model": "m"}, 33)
    assert not stream and r.max_new_tokens == 33 and r.sampling.temperature == 1.0 and r.stop == ()
    r, stream = request_from_json({"prompt": ["hi"], "max_tokens": 4, "temperature": 0, "stop": "x", "stream": True,
                                   "seed": 9, "num_draft_tokens": 2, "presence_penalty": 0}, 33)
    assert stream and r.stop == ("x",) and r.sampling.greedy and r.sampling.seed == 9 and r.num_draft_tokens == 2


@pytest.mark.parametrize("body,name", [
    ([], "body"), ({}, "prompt"), ({"prompt": ["a", "b"]}, "prompt"), ({"prompt": "a", "max_tokens": 1.5}, "max_tokens"),
    ({"prompt": "a", "top_k": -1}, "top_k"), ({"prompt": "a", "stop": [3]}, "stop"), ({"prompt": "a", "echo": True}, "echo"),
    ({"prompt": "a", "num_draft_tokens": "4"}, "num_draft_tokens"), ({"prompt": "a", "best_of": 2}, "best_of"),
])
def test_openai_json_bad_fields_name_themselves(body, name):
    with pytest.raises(InvalidRequest) as e:
        request_from_json(body, 8)
    assert e.value.field == name


def _decode(ids):
    return bytes(ids).decode("utf-8", errors="replace")


def test_text_deltas_concatenate_to_the_final_text():
    ids = list("héllo wörld, done".encode())  # multi-byte characters split across rounds
    for cut in range(1, 5):
        s = TextStream(_decode)
        chunks = [ids[i:i + cut] for i in range(0, len(ids), cut)]
        out = [s.push(c) for c in chunks[:-1]] + [s.push(chunks[-1], final_text=_decode(ids))]
        assert "".join(out) == "héllo wörld, done"
        assert all("\ufffd" not in d for d in out)  # never half a character


def test_text_deltas_hold_back_a_possible_stop_string():
    text = "abc STOP later"
    ids = list(text.encode())
    s = TextStream(_decode, stop=("STOP",))
    sent = "".join(s.push([i]) for i in ids[: text.index("STOP") + 3])  # "abc STO": the stop may begin here
    assert "S" not in sent
    final = text[: text.index("STOP")]  # the engine cuts the text at the stop string
    assert sent + s.push(ids[len(sent):], final_text=final) == final


def test_app_args_take_a_config_a_dict_or_a_path(tmp_path):
    tiny = load_config("configs/tiny.yaml")
    assert config_from_args({"config": "configs/tiny.yaml"}) == tiny
    assert config_from_args(tiny.model_dump()) == tiny
    assert config_from_args(None) == load_config(None)
    with pytest.raises(ConfigError, match="serve.drafts: .*min_replicas"):
        config_from_args({"serve": {"drafts": {"min_replicas": 3, "max_replicas": 2}}})
    with pytest.raises(ConfigError, match="serve.grpc_port"):
        config_from_args({"serve": {"grpc_port": 70000}})
    with pytest.raises(ConfigError, match="serve.nope: unknown key"):
        config_from_args({"serve": {"nope": 1}})


def test_openai_chat_json_to_a_chat_request():
    from specserve.cluster.api import chat_request_from_json
    from specserve.cluster.runtime.engine import ChatMessage

    body = {"model": "m", "messages": [{"role": "developer", "content": "Be brief."},
                                       {"role": "user", "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}]},
                                       {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Again?"}],
            "max_completion_tokens": 7, "temperature": 0, "stream": True, "stream_options": {"include_usage": True},
            "tools": [], "tool_choice": "none", "response_format": {"type": "text"}, "seed": 3}
    r, stream, usage = chat_request_from_json(body, 33)
    assert stream and usage and r.max_new_tokens == 7 and r.sampling.greedy and r.sampling.seed == 3 and r.prompt == ""
    assert r.messages == (ChatMessage("system", "Be brief."), ChatMessage("user", "Hi there"),
                          ChatMessage("assistant", "Hello."), ChatMessage("user", "Again?"))
    r, stream, usage = chat_request_from_json({"messages": [{"role": "user", "content": "x"}], "max_tokens": 5}, 33)
    assert (r.max_new_tokens, stream, usage, r.sampling.temperature) == (5, False, False, 1.0)


@pytest.mark.parametrize("body,name", [
    ({}, "messages"), ({"messages": []}, "messages"), ({"messages": "hi"}, "messages"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": 3}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, "messages[0].content[0]"),
    ({"messages": [{"role": "user", "content": "x", "tool_calls": []}]}, "messages[0].tool_calls"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].role"),
    ({"messages": [{"role": ["user"], "content": "x"}]}, "messages[0].role"),  # unhashable: still a named error
    ({"messages": ["hi"]}, "messages[0]"),
    ({"messages": [{"role": "user", "content": "x"}], "max_tokens": -1}, "max_tokens"),
    ({"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 0}, "max_completion_tokens"),
    ({"messages": [{"role": "user", "content": "x"}], "n": 2}, "n"),
    ({"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]}, "tools"),
    ({"messages": [{"role": "user", "content": "x"}], "logprobs": True}, "logprobs"),
    ({"messages": [{"role": "user", "content": "x"}], "stream_options": {"include_usage": True}}, "stream_options"),
    ({"messages": [{"role": "user", "content": "x"}], "stream": True, "stream_options": {"x": 1}}, "stream_options"),
    ({"messages": [{"role": "user", "content": "x"}], "temperature": "warm"}, "temperature"),
    ({"messages": [{"role": "user", "content": "x"}], "frobnicate": 1}, "frobnicate"),
])
def test_openai_chat_json_bad_fields_name_themselves(body, name):
    from specserve.cluster.api import chat_request_from_json

    with pytest.raises(InvalidRequest) as e:
        chat_request_from_json(body, 8)
    assert e.value.field == name


def test_proto_messages_make_a_chat_request():
    from specserve.cluster.runtime.engine import ChatMessage, check_request_fields

    msg = pb.GenerateRequest(messages=[pb.ChatMessage(role="system", content="s"), pb.ChatMessage(role="user", content="u")])
    r = request_from_proto(msg, 8)
    assert r.messages == (ChatMessage("system", "s"), ChatMessage("user", "u"))
    check_request_fields(r, 4)
    for bad, name in ((pb.GenerateRequest(prompt="p", messages=[pb.ChatMessage(role="user", content="u")]), "messages"),
                      (pb.GenerateRequest(messages=[pb.ChatMessage(role="bot", content="u")]), "messages[0].role")):
        with pytest.raises(InvalidRequest) as e:
            check_request_fields(request_from_proto(bad, 8), 4)
        assert e.value.field == name
