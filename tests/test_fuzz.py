"""Property-based tests (hypothesis) of the public API's conversions: any JSON body or proto
message, however extreme, becomes a valid request or an InvalidRequest naming a field, never
another exception. The served versions (test_serving.py) send such requests to a live service."""

import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from specserve.v1 import generation_pb2 as pb

from specserve.cluster.api import check_limits, chat_request_from_json, request_from_json, request_from_proto
from specserve.cluster.config import Limits
from specserve.cluster.runtime.engine import check_request_fields
from specserve.cluster.speculation import InvalidRequest

LIMITS = Limits()
SCALARS = (st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70)
           | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=40)
           | st.sampled_from(["", "\ud800", "\x00", "0", "1e309", "NaN"]))
VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                      max_leaves=12)
MESSAGES = st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "developer", "tool", "x"]) | VALUES,
                                           "content": st.text(max_size=30) | VALUES}), max_size=4) | VALUES
COMMON = ["model", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "stream", "n", "num_draft_tokens",
          "user", "logprobs", "presence_penalty", "logit_bias", "stream_options", "tools", "frobnicate"]


def bodies(required: str, required_values):
    known = st.dictionaries(st.sampled_from(COMMON + ["max_completion_tokens"]), VALUES, max_size=6)
    return st.one_of(VALUES, st.builds(lambda extra, v: extra | {required: v}, known, required_values))


def _accepted_or_named(convert):
    try:
        request = convert()
    except InvalidRequest as e:
        assert isinstance(e.field, str) and e.field and str(e).startswith(f"{e.field}:")
        return None
    try:
        check_request_fields(request, 8)
        check_limits(request, LIMITS)
    except InvalidRequest as e:
        assert e.field
        return None
    assert request.max_new_tokens >= 1 and math.isfinite(request.sampling.temperature)
    return request


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(bodies("prompt", st.text(max_size=30) | VALUES))
def test_any_completions_body_is_a_request_or_a_named_error(body):
    _accepted_or_named(lambda: request_from_json(body, 16)[0])


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(bodies("messages", MESSAGES))
def test_any_chat_body_is_a_request_or_a_named_error(body):
    _accepted_or_named(lambda: chat_request_from_json(body, 16)[0])


@settings(max_examples=400, deadline=None)
@given(prompt=st.text(max_size=50), max_new=st.integers(0, 2**32 - 1), temperature=st.floats(width=32),
       top_k=st.integers(0, 2**32 - 1), top_p=st.floats(width=32), seed=st.none() | st.integers(0, 2**64 - 1),
       k=st.none() | st.integers(0, 2**32 - 1), stop=st.lists(st.text(max_size=300), max_size=20),
       messages=st.lists(st.tuples(st.text(max_size=10), st.text(max_size=20)), max_size=3))
def test_any_proto_request_is_a_request_or_a_named_error(prompt, max_new, temperature, top_k, top_p, seed, k, stop, messages):
    msg = pb.GenerateRequest(prompt=prompt, max_new_tokens=max_new, temperature=temperature, top_k=top_k, top_p=top_p,
                             stop=stop, messages=[pb.ChatMessage(role=r, content=c) for r, c in messages])
    if seed is not None:
        msg.seed = seed
    if k is not None:
        msg.num_draft_tokens = k
    _accepted_or_named(lambda: request_from_proto(msg, 16))


def test_the_negative_control_a_conversion_without_checks_is_caught():
    """The property holds only because the conversions check: one that trusts the body fails it."""
    from specserve.cluster.runtime.engine import GenerationRequest

    @settings(max_examples=400, deadline=None, database=None)
    @given(bodies("prompt", st.text(max_size=30) | VALUES))
    def naive(body):
        _accepted_or_named(lambda: GenerationRequest(body["prompt"], int(body.get("max_tokens") or 16)))

    with pytest.raises(Exception) as e:
        naive()
    assert not isinstance(e.value, InvalidRequest)
