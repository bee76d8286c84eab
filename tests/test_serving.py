"""The Ray Serve application from configs/tiny.yaml (tensor parallel 2 behind a coordinator, draft
replicas over gRPC) through its public interfaces: a plain gRPC client on loopback and a plain
HTTP client, as users integrate."""

import concurrent.futures
import json
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import pytest
import yaml
from specserve.v1 import generation_pb2 as pb
from specserve.v1 import generation_pb2_grpc as pb_grpc

from specserve.cluster.config import parse_config
from conftest import TINY_PROMPTS, free_port, wait_until

pytestmark = pytest.mark.ray

TINY_YAML = Path(__file__).resolve().parent.parent / "configs" / "tiny.yaml"
APP = "specserve-test"


@pytest.fixture(scope="module")
def service(ray_cluster):
    from ray import serve

    from specserve.cluster import app

    data = yaml.safe_load(TINY_YAML.read_text())
    data["serve"] = {
        "app_name": APP, "grpc_port": free_port(), "http_port": free_port(), "host": "127.0.0.1",
        "max_new_tokens": 24, "max_ongoing_requests": 6, "max_queued_requests": 6,
        "drafts": {"min_replicas": 1, "max_replicas": 2, "target": 1, "upscale_delay_s": 0, "downscale_delay_s": 8},
        "draft_refresh_s": 0.5,
    }
    config = parse_config(data)
    app.start(config)
    handle = serve.get_deployment_handle("engine", APP)
    channel = grpc.insecure_channel(f"127.0.0.1:{config.serve.grpc_port}")
    yield config, pb_grpc.SpeculativeGenerationStub(channel), handle
    channel.close()
    serve.shutdown()


META = (("application", APP),)


def _http(config, path, body=None):
    url = f"http://127.0.0.1:{config.serve.http_port}{path}"
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def _http_raw(config, path, data: bytes):
    req = urllib.request.Request(f"http://127.0.0.1:{config.serve.http_port}{path}", data=data,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def _events(text: str) -> list:
    lines = [line.removeprefix("data: ") for line in text.splitlines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(x) for x in lines[:-1]]


def test_unary_and_stream_agree_for_a_seed(service):
    """A seed fixes the sample for a given K (adaptive K follows the load, and so would the sample)."""
    _, stub, _ = service
    request = pb.GenerateRequest(prompt=TINY_PROMPTS[0], max_new_tokens=20, temperature=0.9, top_p=0.95, seed=11,
                                 num_draft_tokens=3)
    unary = stub.Generate(request, metadata=META)
    assert unary.finish_reason in {"length", "eos"} and len(unary.token_ids) > 0
    assert unary.stats.target_calls > 0 and unary.prompt_tokens > 0
    pieces = list(stub.GenerateStream(request, metadata=META))
    assert len(pieces) > 1 and all(p.finish_reason == "" for p in pieces[:-1])
    assert [t for p in pieces for t in p.token_ids] == list(unary.token_ids)
    assert "".join(p.text for p in pieces) == unary.text
    assert pieces[-1].stats == unary.stats


def test_greedy_with_speculation_equals_plain_decoding(service):
    _, stub, _ = service

    def run(prompt, k):
        extra = {} if k is None else {"num_draft_tokens": k}
        return stub.Generate(pb.GenerateRequest(prompt=prompt, max_new_tokens=20, **extra), metadata=META)

    with concurrent.futures.ThreadPoolExecutor(4) as pool:  # concurrent: they share rounds
        spec = list(pool.map(lambda p: run(p, 3), TINY_PROMPTS[:4]))
        adaptive = list(pool.map(lambda p: run(p, None), TINY_PROMPTS[:4]))  # K from the server's policy
        plain = list(pool.map(lambda p: run(p, 0), TINY_PROMPTS[:4]))
    assert [list(r.token_ids) for r in spec] == [list(r.token_ids) for r in plain]
    assert [list(r.token_ids) for r in adaptive] == [list(r.token_ids) for r in plain]
    assert [r.text for r in spec] == [r.text for r in plain]
    assert sum(r.stats.accepted_tokens for r in spec) > 0 and all(r.stats.draft_tokens == 0 for r in plain)


def test_stop_strings_end_the_text_in_both_modes(service):
    _, stub, _ = service
    full = stub.Generate(pb.GenerateRequest(prompt=TINY_PROMPTS[2], max_new_tokens=24), metadata=META)
    stop = full.text[5:7]
    assert len(stop) == 2
    request = pb.GenerateRequest(prompt=TINY_PROMPTS[2], max_new_tokens=24, stop=[stop])
    unary = stub.Generate(request, metadata=META)
    assert unary.finish_reason == "stop" and unary.text == full.text[: full.text.index(stop)]
    assert "".join(p.text for p in stub.GenerateStream(request, metadata=META)) == unary.text


def test_health_over_grpc_and_http(service):
    config, stub, _ = service
    health = stub.Health(pb.HealthRequest(), metadata=META)
    assert health.status == "SERVING" and health.tp_size == 2 and health.target == "tiny-llama"
    assert health.dtype == "float32"  # configs/tiny.yaml names it; `auto` is resolved on the rank (test_dtype.py)
    status, body = _http(config, "/healthz")
    assert status == 200 and json.loads(body)["status"] == "SERVING"
    status, _ = _http(config, "/-/healthz")  # Serve's own proxy health
    assert status == 200


def test_http_completions_unary_and_streaming(service):
    config, stub, _ = service
    body = {"model": "tiny-llama", "prompt": TINY_PROMPTS[4], "max_tokens": 16, "temperature": 0}
    status, text = _http(config, "/v1/completions", body)
    assert status == 200, text
    out = json.loads(text)
    grpc_out = stub.Generate(pb.GenerateRequest(prompt=TINY_PROMPTS[4], max_new_tokens=16), metadata=META)
    assert out["choices"][0]["text"] == grpc_out.text
    assert out["usage"]["completion_tokens"] == len(grpc_out.token_ids)
    status, text = _http(config, "/v1/completions", body | {"stream": True})
    assert status == 200
    chunks = _events(text)
    assert "".join(c["choices"][0]["text"] for c in chunks) == grpc_out.text
    assert chunks[-1]["choices"][0]["finish_reason"] in {"length", "stop"}
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])


def _openai(config):
    import openai

    return openai.OpenAI(base_url=f"http://127.0.0.1:{config.serve.http_port}/v1", api_key="unused", max_retries=0,
                         timeout=60)


CHAT = [{"role": "system", "content": "Answer in code."}, {"role": "user", "content": TINY_PROMPTS[4]}]


def test_the_official_openai_client_chats_unary_and_streaming(service):
    """/v1/chat/completions through the openai package: the chat template applied to the messages
    (the same answer as gRPC's messages field), streamed deltas concatenating to the unary text,
    the role first, finish_reason last, then the usage chunk that stream_options asks for."""
    config, stub, _ = service
    client = _openai(config)
    unary = client.chat.completions.create(model="tiny-llama", messages=CHAT, max_completion_tokens=16, temperature=0)
    grpc_out = stub.Generate(pb.GenerateRequest(messages=[pb.ChatMessage(**m) for m in CHAT], max_new_tokens=16),
                             metadata=META)
    answer = unary.choices[0].message
    assert answer.role == "assistant" and answer.content == grpc_out.text and len(grpc_out.token_ids) > 0
    assert unary.object == "chat.completion" and unary.choices[0].finish_reason in ("length", "stop")
    assert unary.usage.completion_tokens == len(grpc_out.token_ids) and unary.usage.prompt_tokens == grpc_out.prompt_tokens
    chunks = list(client.chat.completions.create(model="tiny-llama", messages=CHAT, max_tokens=16, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == answer.content
    finals = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finals[-1] == unary.choices[0].finish_reason and not any(finals[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == unary.usage.total_tokens
    plain = list(client.chat.completions.create(model="tiny-llama", messages=CHAT, max_tokens=16, temperature=0, stream=True))
    assert all(c.usage is None for c in plain) and all(c.choices for c in plain)
    completion = client.completions.create(model="tiny-llama", prompt=TINY_PROMPTS[4], max_tokens=8, temperature=0)
    assert completion.choices[0].text and completion.usage.completion_tokens == 8


@pytest.mark.parametrize("fields,name", [
    ({"n": 2}, "n"), ({"max_tokens": -1}, "max_tokens"), ({"max_completion_tokens": 0}, "max_completion_tokens"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, "tools"),
    ({"logprobs": True}, "logprobs"), ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
    ({"messages": []}, "messages"), ({"temperature": -1}, "temperature"),
    ({"messages": [{"role": "user", "content": "x" * 5000}]}, "messages"),  # longer than the context: the engine's check
])
def test_openai_client_errors_name_the_field_it_sent(service, fields, name):
    import openai

    config, _, _ = service
    args = {"model": "tiny-llama", "messages": CHAT, "max_tokens": 4} | fields
    with pytest.raises(openai.BadRequestError) as e:
        _openai(config).chat.completions.create(**args)
    assert e.value.status_code == 400 and e.value.body["param"] == name, e.value.body


def _fuzz_bodies():
    from hypothesis import strategies as st
    from test_fuzz import MESSAGES, VALUES

    small = st.integers(-3, 6) | VALUES
    chat = st.fixed_dictionaries({"messages": MESSAGES | st.just([{"role": "user", "content": "hi"}])},
                                 optional={"max_tokens": small, "temperature": st.floats(-1, 3) | VALUES, "top_p": VALUES,
                                           "stop": VALUES, "stream": st.booleans() | VALUES, "seed": VALUES, "n": small,
                                           "tools": VALUES, "stream_options": VALUES})
    completion = st.fixed_dictionaries({"prompt": st.text(max_size=40) | VALUES},
                                       optional={"max_tokens": small, "top_k": small, "stop": VALUES, "echo": VALUES,
                                                 "num_draft_tokens": small})
    return st.tuples(st.sampled_from(["/v1/chat/completions"]), chat) | st.tuples(st.just("/v1/completions"), completion)


def test_fuzzed_http_requests_get_an_answer_or_a_named_error_and_the_service_stays_healthy(service):
    """Random and extreme JSON (hypothesis) at both OpenAI routes, then raw bytes that are not JSON
    or not UTF-8: every reply is 200 with an answer, or 400 naming a field; then a normal request works."""
    from hypothesis import HealthCheck, given, settings

    config, stub, _ = service

    @settings(max_examples=40, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(_fuzz_bodies())
    def check(case):
        path, body = case
        body = body if not isinstance(body, dict) else {k: v for k, v in body.items()} | (
            {"max_tokens": 4} if not isinstance(body.get("max_tokens"), int) or body.get("max_tokens", 0) > 6 else {})
        try:
            data = json.dumps(body, allow_nan=True).encode()
        except (TypeError, ValueError):
            return
        status, text = _http_raw(config, path, data)
        if status == 200:
            lines = [x.removeprefix("data: ") for x in text.splitlines() if x.startswith("data: ")]
            assert (lines and lines[-1] == "[DONE]") or "choices" in json.loads(text), text[:200]
        else:
            assert status == 400, (status, text[:300])
            assert json.loads(text)["error"]["param"], text

    check()
    for raw in (b"{nope", b"\xff\xfe{}", b'{"prompt": "x", "temperature": 1e999}', b'{"prompt": "x", "max_tokens": 1e999}',
                b"[]", b"null", b'{"messages": [{"role": "user", "content": "\\ud800"}], "max_tokens": 2}'):
        for path in ("/v1/completions", "/v1/chat/completions"):
            status, text = _http_raw(config, path, raw)
            assert status in (200, 400), (raw, status, text)
            assert status == 200 or json.loads(text)["error"]["param"], text
    assert stub.Health(pb.HealthRequest(), metadata=META).status == "SERVING"
    assert stub.Generate(pb.GenerateRequest(prompt="ok", max_new_tokens=3), metadata=META).token_ids


def test_fuzzed_grpc_requests_get_an_answer_or_invalid_argument(service):
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    _, stub, _ = service

    @settings(max_examples=30, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(prompt=st.text(max_size=40), max_new=st.sampled_from([0, 1, 3, 2**32 - 1]), temperature=st.floats(width=32),
           top_k=st.integers(0, 2**32 - 1), top_p=st.floats(width=32), k=st.none() | st.integers(0, 2**32 - 1),
           stop=st.lists(st.text(max_size=300), max_size=20),
           messages=st.lists(st.tuples(st.sampled_from(["user", "system", "bot", ""]), st.text(max_size=20)), max_size=2))
    def check(prompt, max_new, temperature, top_k, top_p, k, stop, messages):
        msg = pb.GenerateRequest(prompt=prompt, max_new_tokens=max_new, temperature=temperature, top_k=top_k,
                                 top_p=top_p, stop=stop, messages=[pb.ChatMessage(role=r, content=c) for r, c in messages])
        if k is not None:
            msg.num_draft_tokens = k
        try:
            reply = stub.Generate(msg, metadata=META, timeout=60)
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.INVALID_ARGUMENT, (e.code(), e.details())
            assert ":" in e.details() and e.details().split(":")[0], e.details()
            return
        assert reply.finish_reason in ("length", "stop", "eos")

    check()
    assert stub.Generate(pb.GenerateRequest(prompt="ok", max_new_tokens=3), metadata=META).token_ids


BAD_GRPC = [
    ({"prompt": ""}, "prompt"),
    ({"prompt": "x", "temperature": -1.0}, "temperature"),
    ({"prompt": "x", "temperature": float("nan")}, "temperature"),
    ({"prompt": "x", "top_p": 1.5}, "top_p"),
    ({"prompt": "x", "num_draft_tokens": 99}, "num_draft_tokens"),
    ({"prompt": "x", "stop": [""]}, "stop"),
    ({"prompt": "x" * 5000}, "prompt"),  # longer than the model's context: found by the engine
    ({"prompt": "x", "max_new_tokens": 4_294_967_295}, "max_new_tokens"),  # serve.limits.max_new_tokens
    ({"prompt": "x", "stop": ["s"] * 17}, "stop"),  # serve.limits.max_stop_strings
    ({"prompt": "x", "stop": ["s" * 257]}, "stop"),  # serve.limits.max_stop_chars
    ({"prompt": "x" * (1 << 20)}, "request"),  # serve.limits.max_request_bytes
]


@pytest.mark.parametrize("fields,name", BAD_GRPC)
def test_bad_grpc_fields_are_invalid_argument(service, fields, name):
    _, stub, _ = service
    for call in (stub.Generate, lambda r, **kw: list(stub.GenerateStream(r, **kw))):
        with pytest.raises(grpc.RpcError) as e:
            call(pb.GenerateRequest(**({"max_new_tokens": 4} | fields)), metadata=META)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert e.value.details().startswith(f"{name}:"), e.value.details()


BAD_HTTP = [
    ({"prompt": ""}, "prompt"),
    ({"prompt": "x", "temperature": -1}, "temperature"),
    ({"prompt": "x", "temperature": "hot"}, "temperature"),
    ({"prompt": "x", "top_p": 0}, "top_p"),
    ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "x", "max_tokens": -1}, "max_tokens"),
    ({"prompt": "x", "max_tokens": 10**6}, "max_tokens"),
    ({"prompt": "x", "stop": ["s"] * 17}, "stop"),
    ({"prompt": "x" * (1 << 20)}, "body"),
    ({"prompt": "x", "n": 2}, "n"),
    ({"prompt": "x", "logprobs": 3}, "logprobs"),
    ({"prompt": "x", "frobnicate": 1}, "frobnicate"),
    ({"prompt": "x", "stream": "yes"}, "stream"),
    ({"prompt": "x", "seed": -3}, "seed"),
    ({"prompt": "x" * 5000}, "prompt"),
]


@pytest.mark.parametrize("fields,name", BAD_HTTP)
def test_bad_http_fields_are_400_naming_the_field(service, fields, name):
    config, _, _ = service
    status, text = _http(config, "/v1/completions", {"max_tokens": 4} | fields)
    assert status == 400, text
    assert json.loads(text)["error"]["param"] == name


def test_http_body_must_be_json(service):
    config, _, _ = service
    req = urllib.request.Request(f"http://127.0.0.1:{config.serve.http_port}/v1/completions", data=b"{nope")
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=30)
    assert e.value.code == 400 and json.loads(e.value.read())["error"]["param"] == "body"


def _sequences(handle) -> tuple[int, int, int]:
    """(coordinator, target ranks, draft replicas): sequences each holds."""
    from ray import serve

    stats = handle.stats.remote().result(timeout_s=10)  # a probe that waits for an engine slot retries
    drafts = serve.get_deployment_handle("drafts", APP).broadcast("sequences").results(timeout_s=10)
    ranks = handle.target_sequences.remote().result(timeout_s=10)
    return stats["active"], ranks, sum(drafts)


def test_cancelled_stream_and_expired_deadline_free_the_sequence(service):
    _, stub, handle = service
    assert _sequences(handle) == (0, 0, 0)
    # greedy: this prompt's continuation runs 2,000 tokens without EOS (about 1,500 rounds)
    request = pb.GenerateRequest(prompt=TINY_PROMPTS[1], max_new_tokens=2000, num_draft_tokens=2)  # drafts held too
    stream = stub.GenerateStream(request, metadata=META)
    next(stream), next(stream)  # it is running
    assert _sequences(handle)[0] == 1
    stream.cancel()
    wait_until(lambda: _sequences(handle) == (0, 0, 0), what="the cancelled sequence to be freed everywhere")

    with pytest.raises(grpc.RpcError) as e:
        stub.Generate(request, metadata=META, timeout=1.0)
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    wait_until(lambda: _sequences(handle) == (0, 0, 0), what="the expired sequence to be freed everywhere")


def _draft_replicas() -> int:
    from ray import serve

    app = serve.status().applications[APP]
    return sum(n for state, n in app.deployments["drafts"].replica_states.items() if state == "RUNNING")


def _stats(handle) -> dict:
    return handle.stats.remote().result(timeout_s=10)


def test_overload_is_resource_exhausted_and_drafts_scale_up_then_down(service):
    _, stub, handle = service
    # the module's earlier tests may have scaled the drafts up (downscale delay 8 s): start from the minimum
    wait_until(lambda: _draft_replicas() == 1, timeout=120, what="the drafts back at their minimum, 1")
    # greedy: no EOS for 2,000 tokens; a fixed K, so every sequence drafts (adaptive K may choose plain
    # decoding for this draft, whose alpha here is 0.13, and then no replica holds the sequence)
    request = pb.GenerateRequest(prompt=TINY_PROMPTS[3], max_new_tokens=2000, num_draft_tokens=2)
    running = [stub.GenerateStream(request, metadata=META) for _ in range(6)]  # max_ongoing_requests 6
    for s in running:
        next(s)
    # 7 more: 6 queue (max_queued_requests 6) and whichever reaches the queue last is refused
    waiting = [stub.GenerateStream(request, metadata=META) for _ in range(7)]
    wait_until(lambda: any(s.done() for s in waiting), timeout=60, what="one of 7 waiting streams to be refused")
    refused = [s for s in waiting if s.done()]
    assert len(refused) == 1 and refused[0].code() == grpc.StatusCode.RESOURCE_EXHAUSTED, [s.code() for s in refused]
    queued = [s for s in waiting if not s.done()]
    with pytest.raises(grpc.RpcError) as e:  # the queue is full: the next is refused at once
        next(stub.GenerateStream(request, metadata=META, timeout=30))
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert not any(s.done() for s in queued + running)

    # 6 sequences, target 1 sequence per draft replica: Serve scales the drafts to their max, 2
    wait_until(lambda: _draft_replicas() == 2, timeout=120,
               what=lambda: f"a second draft replica (sequences {_sequences(handle)}, replicas {_draft_replicas()})")
    # with 4 sequences left the drafts stay at 2, and the engine has free slots for stats() (two, so that
    # a cancelled queued call that Serve still routes cannot hold the only one)
    for s in queued + running[:2]:
        s.cancel()
    wait_until(lambda: _sequences(handle) == (4, 4, 4), timeout=120, what="the 6 queued and 2 running to be dropped")
    last = {}

    def engine_finds_it() -> bool:  # it looks every 0.5 s
        last.update(_stats(handle))
        return last["draft_live"] == 2

    wait_until(engine_finds_it, timeout=30, what=lambda: f"the engine to find the new draft replica (stats {last})")
    assert _draft_replicas() == 2
    for s in running[2:]:
        s.cancel()
    wait_until(lambda: _sequences(handle) == (0, 0, 0), what="every sequence freed")
    wait_until(lambda: _draft_replicas() == 1, timeout=120, what="the drafts to scale back down")
    wait_until(lambda: _stats(handle)["draft_live"] == 1, what="the engine to drop it")
    out = stub.Generate(pb.GenerateRequest(prompt=TINY_PROMPTS[0], max_new_tokens=8), metadata=META)
    assert len(out.token_ids) == 8 or out.finish_reason == "eos"


def test_metrics_reach_prometheus(service):
    """Ray's metrics agent exports the service's metrics in Prometheus format (names prefixed ray_)."""
    import ray

    _, stub, handle = service
    stub.Generate(pb.GenerateRequest(prompt=TINY_PROMPTS[0], max_new_tokens=12, num_draft_tokens=3), metadata=META)
    stats = handle.stats.remote().result()
    assert stats["tokens_per_target_call"] > 1.0 and 0 < stats["acceptance_rate"] <= 1
    port = ray._private.worker.global_worker.node.metrics_export_port
    wanted = ["specserve_requests", "specserve_request_seconds", "specserve_time_to_first_token_seconds",
              "specserve_response_tokens", "specserve_tokens", "specserve_target_calls", "specserve_round_seconds",
              "specserve_queue_depth", "specserve_active_sequences", "specserve_draft_replicas"]
    seen = set()

    def exported():
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
            text = r.read().decode()
        seen.update(name for name in wanted if f"ray_{name}" in text)
        return seen == set(wanted)

    wait_until(exported, timeout=60, what=lambda: f"metrics {sorted(set(wanted) - seen)}")


def test_the_load_bench_measures_the_served_streams(service):
    """bench --load's served rows: concurrent gRPC streams against the in-process engine, the same
    greedy tokens both ways, every figure present."""
    from specserve.cluster.bench_load import run_engine, run_streams
    from specserve.cluster.client import Client, proto_request
    from specserve.cluster.runtime.engine import GenerationRequest
    from specserve.cluster.runtime.factory import build_engine

    config, _, _ = service
    client = Client(f"127.0.0.1:{config.serve.grpc_port}", config.serve.app_name)
    try:
        served = run_streams(client, [proto_request(p, 12, num_draft_tokens=0) for p in TINY_PROMPTS[:4]], 4)
    finally:
        client.close()
    local = run_engine(build_engine(config), [GenerationRequest(p, 12, num_draft_tokens=0) for p in TINY_PROMPTS[:4]])
    for run in (served, local):
        assert run["sequences"] == 4 and run["tokens_per_s"] > 0 and run["ttft_p50_s"] > 0
        assert 0 < run["token_latency_p50_s"] <= run["token_latency_p99_s"]
    assert served["tokens"] == local["tokens"]
