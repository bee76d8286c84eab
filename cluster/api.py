"""The public API's requests and responses (gRPC specserve.v1 and OpenAI-style JSON) to and from
the engine's types. Pure: no Ray, no server. Every bad field raises InvalidRequest naming it."""

from __future__ import annotations

import math

from .runtime.engine import GenerationRequest, GenerationResult
from .speculation import InvalidRequest, SamplingParams

MAX_SEED = 2**63 - 1


def _sampling(temperature, top_k, top_p, seed) -> SamplingParams:
    if seed is not None and not (isinstance(seed, int) and not isinstance(seed, bool) and 0 <= seed <= MAX_SEED):
        raise InvalidRequest("seed", f"must be an integer in [0, {MAX_SEED}], got {seed!r}")
    return SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)


def request_from_proto(msg, default_max_new_tokens: int) -> GenerationRequest:
    """A specserve.v1.GenerateRequest; max_new_tokens 0 takes the server's default."""
    if not math.isfinite(msg.temperature):
        raise InvalidRequest("temperature", f"must be a finite number >= 0, got {msg.temperature!r}")
    return GenerationRequest(
        prompt=msg.prompt,
        max_new_tokens=msg.max_new_tokens or default_max_new_tokens,
        # top_p 0 (the proto default) means no truncation, like top_k 0
        sampling=_sampling(float(msg.temperature), int(msg.top_k), float(msg.top_p) or 1.0,
                           msg.seed if msg.HasField("seed") else None),
        num_draft_tokens=msg.num_draft_tokens if msg.HasField("num_draft_tokens") else None,
        stop=tuple(msg.stop),
    )


def fill_proto(msg, token_ids: list[int], text: str, result: GenerationResult | None):
    """A specserve.v1.GenerateResponse: the given tokens and text, and the end when result is set."""
    msg.token_ids.extend(token_ids)
    msg.text = text
    if result is not None:
        msg.finish_reason = result.finish_reason
        msg.prompt_tokens = result.prompt_tokens
        msg.stats.target_calls = result.stats.target_calls
        msg.stats.draft_tokens = result.stats.draft_tokens
        msg.stats.accepted_tokens = result.stats.accepted_tokens
    return msg


# -- OpenAI-compatible /v1/completions -----------------------------------------------------------
_ACCEPTED = {"model", "prompt", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "stream", "n",
             "num_draft_tokens", "user"}
_NEUTRAL = {"presence_penalty": 0, "frequency_penalty": 0, "logprobs": None, "echo": False, "best_of": 1,
            "suffix": None, "logit_bias": None, "stream_options": None}  # accepted only at these values


def _number(body, key, default, kind=float):
    v = body.get(key, default)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (kind is int and not isinstance(v, int)):
        raise InvalidRequest(key, f"must be {'an integer' if kind is int else 'a number'}, got {v!r}")
    return v


def request_from_json(body, default_max_new_tokens: int) -> tuple[GenerationRequest, bool]:
    """An OpenAI completions body; returns the request and whether to stream. OpenAI's defaults:
    temperature 1, top_p 1, max_tokens 16 when absent (here: the server's default)."""
    if not isinstance(body, dict):
        raise InvalidRequest("body", "must be a JSON object")
    for key, value in body.items():
        if key in _NEUTRAL:
            if value != _NEUTRAL[key]:
                raise InvalidRequest(key, f"is not supported (only {_NEUTRAL[key]!r})")
        elif key not in _ACCEPTED:
            raise InvalidRequest(key, "unknown field")
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if not isinstance(prompt, str) or not prompt:
        raise InvalidRequest("prompt", "must be a non-empty string")
    if _number(body, "n", 1, int) != 1:
        raise InvalidRequest("n", "only 1 completion per request")
    stop = body.get("stop") or ()
    stop = (stop,) if isinstance(stop, str) else stop
    if not isinstance(stop, (list, tuple)) or any(not isinstance(s, str) or not s for s in stop):
        raise InvalidRequest("stop", "must be a non-empty string or a list of them")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise InvalidRequest("stream", f"must be true or false, got {stream!r}")
    max_tokens = _number(body, "max_tokens", default_max_new_tokens, int)
    k = body.get("num_draft_tokens")
    if k is not None:
        k = _number(body, "num_draft_tokens", None, int)
    request = GenerationRequest(
        prompt=prompt,
        max_new_tokens=max_tokens,
        sampling=_sampling(_number(body, "temperature", 1.0), _number(body, "top_k", 0, int),
                           _number(body, "top_p", 1.0), body.get("seed")),
        num_draft_tokens=k,
        stop=tuple(stop),
    )
    return request, stream


def completion_json(request_id: str, created: int, model: str, text: str, result: GenerationResult | None,
                    chunk: bool = False) -> dict:
    """A completions response (or one server-sent-event chunk of one)."""
    out = {
        "id": request_id,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "text": text, "logprobs": None,
                     "finish_reason": _openai_reason(result.finish_reason) if result else None}],
    }
    if result is not None:
        out["usage"] = {"prompt_tokens": result.prompt_tokens, "completion_tokens": len(result.token_ids),
                        "total_tokens": result.prompt_tokens + len(result.token_ids)}
        out["speculation"] = {"target_calls": result.stats.target_calls, "draft_tokens": result.stats.draft_tokens,
                              "accepted_tokens": result.stats.accepted_tokens}
    return out


def _openai_reason(reason: str) -> str:
    return "length" if reason == "length" else "stop"  # eos and stop strings are both "stop" to OpenAI


class TextStream:
    """Text deltas of a growing token list whose concatenation is the final text exactly: holds
    back a possibly incomplete UTF-8 character and anything that could begin a stop string."""

    def __init__(self, decode, stop: tuple[str, ...] = ()):
        self.decode = decode
        self.hold = max((len(s) for s in stop), default=1) - 1
        self.ids: list[int] = []
        self.sent = 0  # characters emitted

    def push(self, token_ids: list[int], final_text: str | None = None) -> str:
        self.ids.extend(token_ids)
        if final_text is not None:
            delta, self.sent = final_text[self.sent:], len(final_text)
            return delta
        text = self.decode(self.ids)
        end = len(text) - self.hold
        while end > self.sent and text[end - 1] == "\ufffd":
            end -= 1
        if end <= self.sent:
            return ""
        delta, self.sent = text[self.sent:end], end
        return delta
