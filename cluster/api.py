"""The public API's requests and responses (gRPC specserve.v1 and OpenAI-style JSON) to and from
the engine's types. Pure: no Ray, no server. Every bad field raises InvalidRequest naming it."""

from __future__ import annotations

import math

from .runtime.detokenizer import Detokenizer
from .runtime.requests import CHAT_ROLES, ChatMessage, GenerationRequest, GenerationResult
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
        messages=tuple(ChatMessage(m.role, m.content) for m in msg.messages) or None,
    )


def check_limits(request: GenerationRequest, limits, max_tokens_field: str = "max_new_tokens") -> GenerationRequest:
    """serve.limits (specserve.cluster.config.Limits) on a converted request, naming the field the client sent."""
    if request.max_new_tokens > limits.max_new_tokens:
        raise InvalidRequest(max_tokens_field, f"must be at most {limits.max_new_tokens} (serve.limits.max_new_tokens), "
                                               f"got {request.max_new_tokens}")
    if len(request.stop) > limits.max_stop_strings:
        raise InvalidRequest("stop", f"at most {limits.max_stop_strings} stop strings (serve.limits.max_stop_strings), "
                                     f"got {len(request.stop)}")
    for s in request.stop:
        if isinstance(s, str) and len(s) > limits.max_stop_chars:
            raise InvalidRequest("stop", f"a stop string has {len(s)} characters, over serve.limits.max_stop_chars "
                                         f"({limits.max_stop_chars})")
    return request


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
_NEUTRAL = {"presence_penalty": (0, None), "frequency_penalty": (0, None), "logprobs": (None,), "echo": (False, None),
            "best_of": (1, None), "suffix": (None,), "logit_bias": (None, {}), "stream_options": (None,)}  # only these values


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
    _check_fields(body, _ACCEPTED, _NEUTRAL)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if not isinstance(prompt, str) or not prompt:
        raise InvalidRequest("prompt", "must be a non-empty string")
    request = GenerationRequest(
        prompt=prompt,
        max_new_tokens=_max_tokens(body, ("max_tokens",), default_max_new_tokens),
        sampling=_sampling(_number(body, "temperature", 1.0), _number(body, "top_k", 0, int),
                           _number(body, "top_p", 1.0), body.get("seed")),
        num_draft_tokens=_number(body, "num_draft_tokens", None, int),
        stop=_stop(body),
    )
    return request, _stream(body)


def _max_tokens(body: dict, keys: tuple[str, ...], default: int) -> int:
    """The first of `keys` the client sent, checked under its own name; else the server's default."""
    for key in keys:
        if body.get(key) is not None:
            n = _number(body, key, None, int)
            if n <= 0:
                raise InvalidRequest(key, f"must be an integer > 0, got {n}")
            return n
    return default


def _stop(body: dict) -> tuple[str, ...]:
    stop = body.get("stop") or ()
    stop = (stop,) if isinstance(stop, str) else stop
    if not isinstance(stop, (list, tuple)) or any(not isinstance(s, str) or not s for s in stop):
        raise InvalidRequest("stop", "must be a non-empty string or a list of them")
    return tuple(stop)


def _stream(body: dict) -> bool:
    stream = body.get("stream", False)
    if stream is None:
        return False
    if not isinstance(stream, bool):
        raise InvalidRequest("stream", f"must be true or false, got {stream!r}")
    return stream


def _check_fields(body, accepted: set[str], neutral: dict) -> None:
    if not isinstance(body, dict):
        raise InvalidRequest("body", "must be a JSON object")
    for key, value in body.items():
        if key in neutral:
            if value not in neutral[key]:
                shown = " or ".join(repr(v) for v in neutral[key])
                raise InvalidRequest(key, f"is not supported (only {shown})")
        elif key not in accepted:
            raise InvalidRequest(key or '""', "unknown field")
    if _number(body, "n", 1, int) != 1:
        raise InvalidRequest("n", "only 1 completion per request")


# -- OpenAI-compatible /v1/chat/completions ------------------------------------------------------
_CHAT_ACCEPTED = {"model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "seed",
                  "stop", "stream", "stream_options", "n", "num_draft_tokens", "user"}
_CHAT_NEUTRAL = {"presence_penalty": (0, None), "frequency_penalty": (0, None), "logprobs": (None, False),
                 "top_logprobs": (None, 0), "logit_bias": (None, {}), "tools": (None, []), "tool_choice": (None, "none"),
                 "functions": (None, []), "function_call": (None, "none"), "parallel_tool_calls": (None,),
                 "response_format": (None, {"type": "text"}), "store": (None, False), "metadata": (None, {}),
                 "service_tier": (None, "auto", "default"), "modalities": (None, ["text"])}
_ROLE_ALIASES = {"developer": "system"}  # OpenAI's newer name for system instructions


def chat_request_from_json(body, default_max_new_tokens: int) -> tuple[GenerationRequest, bool, bool]:
    """An OpenAI chat completions body; returns the request, whether to stream, and whether the
    stream ends with a usage chunk (stream_options.include_usage)."""
    _check_fields(body, _CHAT_ACCEPTED, _CHAT_NEUTRAL)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest("messages", "must be a non-empty list of messages")
    stream = _stream(body)
    options = body.get("stream_options")
    include_usage = False
    if options is not None:
        if not stream:
            raise InvalidRequest("stream_options", "is only allowed when stream is true")
        if not isinstance(options, dict) or set(options) - {"include_usage"} or \
                not isinstance(options.get("include_usage", False), bool):
            raise InvalidRequest("stream_options", "must be {\"include_usage\": true|false}")
        include_usage = options.get("include_usage", False)
    request = GenerationRequest(
        prompt="",
        max_new_tokens=_max_tokens(body, ("max_completion_tokens", "max_tokens"), default_max_new_tokens),
        sampling=_sampling(_number(body, "temperature", 1.0), _number(body, "top_k", 0, int),
                           _number(body, "top_p", 1.0), body.get("seed")),
        num_draft_tokens=_number(body, "num_draft_tokens", None, int),
        stop=_stop(body),
        messages=tuple(_chat_message(m, i) for i, m in enumerate(messages)),
    )
    return request, stream, include_usage


def _chat_message(m, i: int) -> ChatMessage:
    if not isinstance(m, dict):
        raise InvalidRequest(f"messages[{i}]", "must be an object with a role and a content")
    for key in m:
        if key not in ("role", "content", "name"):
            shown = key or '""'
            raise InvalidRequest(f"messages[{i}].{shown}", "is not supported (tools and function calls are not)")
    role = m.get("role")
    role = _ROLE_ALIASES.get(role, role) if isinstance(role, str) else role
    if role not in CHAT_ROLES:
        raise InvalidRequest(f"messages[{i}].role", f"must be one of {', '.join(CHAT_ROLES)} or developer, "
                             f"got {m.get('role')!r}")
    content = m.get("content")
    if isinstance(content, list):  # content parts: text only
        texts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise InvalidRequest(f"messages[{i}].content[{j}]", "only text parts are supported")
            texts.append(part["text"])
        content = "".join(texts)
    if not isinstance(content, str):
        raise InvalidRequest(f"messages[{i}].content", "must be a string or a list of text parts")
    return ChatMessage(role, content)


def chat_completion_json(request_id: str, created: int, model: str, text: str, result: GenerationResult) -> dict:
    out = {"id": request_id, "object": "chat.completion", "created": created, "model": model,
           "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                        "finish_reason": _openai_reason(result.finish_reason)}]}
    return out | _usage(result)


def chat_chunk_json(request_id: str, created: int, model: str, delta: dict, result: GenerationResult | None,
                    include_usage: bool) -> dict:
    """One server-sent event of a streamed chat completion; `delta` is {"role"?, "content"?}."""
    out = {"id": request_id, "object": "chat.completion.chunk", "created": created, "model": model,
           "choices": [{"index": 0, "delta": delta, "logprobs": None,
                        "finish_reason": _openai_reason(result.finish_reason) if result else None}]}
    if include_usage:
        out["usage"] = None  # OpenAI: null on every chunk but the last, which has no choices
    return out


def chat_usage_chunk_json(request_id: str, created: int, model: str, result: GenerationResult) -> dict:
    return {"id": request_id, "object": "chat.completion.chunk", "created": created, "model": model, "choices": []} \
        | _usage(result)


def _usage(result: GenerationResult) -> dict:
    return {"usage": {"prompt_tokens": result.prompt_tokens, "completion_tokens": len(result.token_ids),
                      "total_tokens": result.prompt_tokens + len(result.token_ids)},
            "speculation": {"target_calls": result.stats.target_calls, "draft_tokens": result.stats.draft_tokens,
                            "accepted_tokens": result.stats.accepted_tokens}}


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
        out |= _usage(result)
    return out


def _openai_reason(reason: str) -> str:
    return "length" if reason == "length" else "stop"  # eos and stop strings are both "stop" to OpenAI


class TextStream:
    """Text deltas of a growing token list whose concatenation is the final text exactly: holds
    back a possibly incomplete UTF-8 character and anything that could begin a stop string. Each
    push decodes a bounded tail of the ids, not all of them (runtime.engine.Detokenizer)."""

    def __init__(self, decode, stop: tuple[str, ...] = ()):
        self.text = Detokenizer(decode)
        self.hold = max((len(s) for s in stop), default=1) - 1
        self.sent = 0  # characters emitted

    def push(self, token_ids: list[int], final_text: str | None = None) -> str:
        if final_text is not None:
            delta, self.sent = final_text[self.sent:], len(final_text)
            return delta
        self.text.push(token_ids)
        unsent = self.text.text_from(self.sent)
        end = len(unsent) - self.hold
        while end > 0 and unsent[end - 1] == "\ufffd":
            end -= 1
        if end <= 0:
            return ""
        self.sent += end
        self.text.forget(self.sent)
        return unsent[:end]
