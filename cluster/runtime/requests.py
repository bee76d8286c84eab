"""What a client asks of the engine and what it gets back, and the checks of a request's fields
that need no model (the gateway, the CLI and the launcher validate with these before any round)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..speculation import InvalidRequest, SamplingParams

CHAT_ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class ChatMessage:
    role: str  # one of CHAT_ROLES
    content: str


@dataclass(frozen=True)
class GenerationRequest:
    prompt: str
    max_new_tokens: int = 128
    sampling: SamplingParams = SamplingParams(temperature=0.0)
    num_draft_tokens: int | None = None  # None: the engine's policy; 0: plain decoding
    stop: tuple[str, ...] = ()
    prompt_ids: tuple[int, ...] | None = None  # already tokenised: used as is, `prompt` ignored
    messages: tuple[ChatMessage, ...] | None = None  # a chat in the model's chat template; `prompt` empty


@dataclass
class SpeculationStats:
    target_calls: int = 0  # decode calls of the target (the prefill is not counted)
    draft_tokens: int = 0  # tokens proposed by the drafter
    accepted_tokens: int = 0  # draft tokens accepted
    evaluated_tokens: int = 0  # draft tokens the target judged: accepted + one per early stop
    rounds_k: list[int] = field(default_factory=list)  # K drafted in each round (a tree's node count)
    tree_rounds: int = 0  # rounds whose draft was a tree
    prefill_s: float = 0.0
    draft_s: float = 0.0
    verify_s: float = 0.0
    sample_s: float = 0.0
    host_syncs: int = 0  # reads from the target's device to the host in its rounds' acceptance (each round's all)
    host_bytes: int = 0  # bytes those reads moved

    @property
    def acceptance_rate(self) -> float:
        """alpha: the per-token acceptance probability (accepted / evaluated)."""
        return self.accepted_tokens / self.evaluated_tokens if self.evaluated_tokens else 0.0

    def as_dict(self) -> dict:
        return {
            "target_calls": self.target_calls,
            "draft_tokens": self.draft_tokens,
            "accepted_tokens": self.accepted_tokens,
            "acceptance_rate": round(self.acceptance_rate, 4),
            "tree_rounds": self.tree_rounds,
            "host_syncs": self.host_syncs,
            "host_bytes": self.host_bytes,
            "timings_s": {
                "prefill": round(self.prefill_s, 4),
                "draft": round(self.draft_s, 4),
                "verify": round(self.verify_s, 4),
                "sample": round(self.sample_s, 4),
            },
        }



@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    finish_reason: str  # "length", "stop" or "eos"
    stats: SpeculationStats
    prompt_tokens: int


@dataclass
class StepOutput:
    seq_id: int
    new_token_ids: list[int]
    result: GenerationResult | None  # set when the sequence finished this round



def check_request_fields(request: GenerationRequest, max_draft_tokens: int) -> None:
    """The checks that need no model: every bad field raises InvalidRequest naming it."""
    if request.messages is not None:
        check_messages(request.messages)
        if request.prompt:
            raise InvalidRequest("messages", "send a prompt or messages, not both")
    elif request.prompt_ids is None and (not isinstance(request.prompt, str) or request.prompt == ""):
        raise InvalidRequest("prompt", "must be a non-empty string")
    m = request.max_new_tokens
    if isinstance(m, bool) or not isinstance(m, int) or m <= 0:
        raise InvalidRequest("max_new_tokens", f"must be an integer > 0, got {m!r}")
    k = request.num_draft_tokens
    if k is not None and (isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= max_draft_tokens):
        raise InvalidRequest("num_draft_tokens", f"must be an integer in [0, {max_draft_tokens}], got {k!r}")
    if not isinstance(request.sampling, SamplingParams):
        raise InvalidRequest("sampling", "must be SamplingParams")
    if any(not isinstance(s, str) or s == "" for s in request.stop):
        raise InvalidRequest("stop", "stop strings must be non-empty strings")
    _check_unicode("prompt", request.prompt)
    for s in request.stop:
        _check_unicode("stop", s)


def _check_unicode(field: str, text) -> None:
    """Text must encode as UTF-8 (JSON can carry lone surrogates, which no tokenizer takes)."""
    if isinstance(text, str):
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise InvalidRequest(field, f"is not valid Unicode ({e.reason} at position {e.start})") from None


def check_messages(messages) -> None:
    if not isinstance(messages, tuple) or not messages:
        raise InvalidRequest("messages", "must be a non-empty list of messages")
    for i, m in enumerate(messages):
        if not isinstance(m, ChatMessage):
            raise InvalidRequest(f"messages[{i}]", "must be a message with a role and a content")
        if m.role not in CHAT_ROLES:
            raise InvalidRequest(f"messages[{i}].role", f"must be one of {', '.join(CHAT_ROLES)}, got {m.role!r}")
        if not isinstance(m.content, str):
            raise InvalidRequest(f"messages[{i}].content", "must be a string")
        _check_unicode(f"messages[{i}].content", m.content)


@dataclass(frozen=True)
class PromptLimits:
    """What the engine's target and settings allow a request (encode_prompt checks against it)."""

    vocab_size: int
    max_context: int  # prompt + output
    max_draft_tokens: int
    max_prompt_tokens: int | None = None  # serve.limits.max_prompt_tokens
    chat_template: bool = False  # a plain prompt is wrapped in the model's chat template


def encode_prompt(request: GenerationRequest, tokenizer, limits: PromptLimits) -> list[int]:
    """Checks every field of the request (InvalidRequest names the one at fault) and returns the
    prompt's token ids: given ids, a chat in the model's template, or the prompt's text."""
    check_request_fields(request, limits.max_draft_tokens)
    if request.prompt_ids is not None:
        ids = list(request.prompt_ids)
        if any(not 0 <= i < limits.vocab_size for i in ids):
            raise InvalidRequest("prompt_ids", f"ids must lie in [0, {limits.vocab_size})")
    elif request.messages is not None:
        ids = tokenizer.encode_messages([{"role": m.role, "content": m.content} for m in request.messages])
    else:
        ids = tokenizer.encode_chat(request.prompt) if limits.chat_template else tokenizer.encode(request.prompt)
    field = "messages" if request.messages is not None else "prompt"
    if not ids:
        raise InvalidRequest(field, "encodes to no tokens")
    if len(ids) >= limits.max_context:
        raise InvalidRequest(field, f"is {len(ids)} tokens, the model's context holds {limits.max_context} "
                                    "(prompt + output)")
    if limits.max_prompt_tokens is not None and len(ids) > limits.max_prompt_tokens:
        raise InvalidRequest(field, f"is {len(ids)} tokens, over the limit serve.limits.max_prompt_tokens "
                                    f"({limits.max_prompt_tokens})")
    if request.max_new_tokens > limits.max_context:
        raise InvalidRequest("max_new_tokens", f"must be at most the model's context ({limits.max_context}), "
                                               f"got {request.max_new_tokens}")
    return ids
