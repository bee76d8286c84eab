"""The local speculative engine: draft, verify in one target call per sequence, rejection-sample
the whole ragged batch at once, roll back both caches. New sequences join between rounds."""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Callable, Iterable

import torch

from ..speculation import (
    AcceptanceTracker,
    AdaptiveK,
    CostModel,
    DraftTree,
    InvalidRequest,
    ProbeSchedule,
    SamplingParams,
    accept_trees,
    draw_seed,
    greedy_accept,
    make_generator,
    rejection_sample,
    warp_probs,
)
from ..speculation.round import Acceptance, DraftBlock, Drafter, DraftRequest, RoundResult, TargetOutput, capabilities_of
from ..speculation.adaptive import verify_cost
from ..speculation.shape import Shape, ShapeStats, cut_shape, default_shape, is_chain, max_fanout, shape_depth
from .calibration import Calibration, load_or_measure, measure_agreement, measure_costs, recheck_draft_cost
from .kv import CausalLM
from .tokenizer import Tokenizer

_NO_DRAFT = DraftBlock([], None)


def _layout(head: int, parents: tuple[int, ...] | None) -> list[int] | None:
    """The verify input's parents (kv.attention_mask) for `head` uncached tokens, then a tree's
    nodes: the head is a chain, its last token is the tree's root. None: all a chain."""
    if parents is None:
        return None
    return list(range(-1, head - 1)) + [head - 1 if p < 0 else head + p for p in parents]


def _lookahead_layout(head: int, k: int, count: int) -> list[int]:
    """PaSS: the uncached tokens and k drafts as a chain, then `count` look-ahead tokens after each
    of the k + 1 accept points (the head's last token, each draft), each block a chain of its own."""
    out = list(range(-1, head + k - 1))
    for j in range(k + 1):
        start = len(out)
        out += [head - 1 + j] + list(range(start, start + count - 1))
    return out


def _split_lookahead(out: TargetOutput, k: int, count: int) -> TargetOutput:
    """The verify rows [k + 1] and the look-ahead rows, [k + 1, count] per accept point."""
    rows = out.scores[k + 1 :]
    return TargetOutput(out.scores[: k + 1], out.hidden, rows.view(k + 1, count, *rows.shape[1:]))


def _draft_ids(blocks: list[DraftBlock]) -> torch.Tensor:
    return torch.tensor([t for b in blocks for t in b.token_ids], dtype=torch.long)  # [T]


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
            "timings_s": {
                "prefill": round(self.prefill_s, 4),
                "draft": round(self.draft_s, 4),
                "verify": round(self.verify_s, 4),
                "sample": round(self.sample_s, 4),
            },
        }


@dataclass
class RoundTiming:
    """One round of the whole batch: wall times of its phases."""

    batch: int = 0  # sequences verified
    draft_tokens: int = 0
    accepted_tokens: int = 0
    prefill_s: float = 0.0
    draft_s: float = 0.0
    verify_s: float = 0.0
    sample_s: float = 0.0


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


@dataclass
class _Sequence:
    seq_id: int
    request: GenerationRequest
    prompt_ids: list[int]
    generator: torch.Generator
    cache: object
    trackers: dict[str, AcceptanceTracker] | None  # adaptive K: alpha per draft source (None: K fixed)
    probes: ProbeSchedule | None = None  # when it drafts again after rounds at K = 0 (adaptive K)
    source: str = ""  # the part of the drafter that drafts for it this round (adaptive K)
    output: list[int] = field(default_factory=list)
    stats: SpeculationStats = field(default_factory=SpeculationStats)
    cached: int = 0  # tokens in the target's cache: all but the last one while decoding
    result: GenerationResult | None = None
    # for a drafter that reads the target: hidden states of committed positions not yet sent to it
    features: list[torch.Tensor] = field(default_factory=list)
    features_sent: int = 0  # positions whose features the drafter has
    text: Detokenizer | None = None  # the output's text, for stop strings

    @property
    def tokens(self) -> list[int]:
        return self.prompt_ids + self.output

    @property
    def uncached(self) -> list[int]:
        """What the next verify block starts with: the rest of the prompt, or the last token."""
        return self.tokens[self.cached :]


class Detokenizer:
    """decode(ids) of a growing token list with a bounded decode a push: the standard prefix /
    read offsets. The text of ids[:read] is settled; each push decodes ids[prefix:] (`left` tokens
    before read, for merge and leading-space rules) and keeps what follows decode(ids[prefix:read]).
    read moves on when that ends in a whole character. Where new tokens change the text before
    read (the window no longer starts with its head), the whole list is decoded once instead.
    Text before `forget`'s mark is dropped."""

    def __init__(self, decode: Callable[[list[int]], str], left: int = 4):
        self.decode, self.left = decode, left
        self.ids: list[int] = []
        self.prefix = self.read = 0
        self.head = ""  # decode(ids[prefix:read])
        self.settled = ""  # the text of ids[:read], from character `base` on
        self.base = 0
        self.tail = ""  # the text of ids[read:] as decoded now (may still change)
        self.changed = 0  # the last push may have changed the text from this character on

    @property
    def settled_len(self) -> int:
        """Characters of ids[:read]: the text's first settled_len characters no longer change."""
        return self.base + len(self.settled)

    def push(self, ids: list[int]) -> None:
        self.ids.extend(ids)
        self.changed = self.settled_len
        window = self.decode(self.ids[self.prefix :])
        if not window.startswith(self.head):  # the new tokens rewrote settled text: decode it all
            self.prefix = self.read = self.base = self.changed = 0
            self.head = self.settled = ""
            window = self.decode(self.ids)
        tail = window[len(self.head) :]
        if not tail or tail.endswith("\ufffd"):  # maybe half a character: read stays
            self.tail = tail
            return
        self.settled, self.tail, self.read = self.settled + tail, "", len(self.ids)
        prefix = max(0, self.read - self.left)
        self.head = window if prefix == self.prefix else self.decode(self.ids[prefix : self.read])
        self.prefix = prefix

    def text_from(self, start: int) -> str:
        """decode(ids)[start:], start at or after what `forget` dropped."""
        assert start >= self.base, (start, self.base)
        if start >= self.settled_len:
            return self.tail[start - self.settled_len :]
        return self.settled[start - self.base :] + self.tail

    def forget(self, upto: int) -> None:
        """Drops the settled text before character `upto`."""
        cut = min(upto, self.settled_len) - self.base
        if cut > 0:
            self.settled, self.base = self.settled[cut:], self.base + cut


def stop_at(text: str, stop: tuple[str, ...]) -> int | None:
    """Where the first stop string in `text` begins (None: none)."""
    hits = [i for i in (text.find(x) for x in stop) if i >= 0]
    return min(hits) if hits else None


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


class SpeculativeEngine:
    def __init__(
        self,
        target,  # an nn.Module (in process) or an object with CausalLM's interface
        tokenizer: Tokenizer,
        drafter: Drafter | None,
        num_draft_tokens: int | str = "adaptive",
        max_draft_tokens: int = 8,
        chat_template: bool = False,
        prefill_chunk: int = 256,
        cost_model: CostModel | None = None,
        prior_alpha: float | None = None,
        calibration_key: dict | None = None,  # where measured costs are cached (calibration.py); None: not cached
        clock: Callable[[], float] = time.perf_counter,
        tree_nodes: int = 0,  # > 0: drafters that draft trees propose up to this many nodes (depth <= K)
        tree_branch: int = 2,  # children per tree node at most
        max_prompt_tokens: int | None = None,  # a cap below the model's context (serve.limits.max_prompt_tokens)
    ):
        # an nn.Module runs in process; anything with CausalLM's interface (a TargetGroup) as is
        self.target = CausalLM(target) if isinstance(target, torch.nn.Module) else target
        self.tokenizer = tokenizer
        self.drafter = drafter
        caps = self.capabilities = capabilities_of(drafter)  # what the drafter declares it reads and does
        self.reads_features = caps.reads_features  # the target's hidden states go to it
        self.num_draft_tokens = num_draft_tokens
        self.max_draft_tokens = max_draft_tokens
        self.chat_template = chat_template and getattr(tokenizer, "has_chat_template", False)
        self.prefill_chunk = prefill_chunk
        self.clock = clock
        self.tree_nodes = tree_nodes if caps.drafts_trees else 0
        self.tree_branch = tree_branch
        self.max_prompt_tokens = max_prompt_tokens
        self._shape_stats: dict[str, ShapeStats] = {}  # acceptance by depth and rank, per drafter source
        self.lookahead = caps.lookahead  # PaSS: L look-ahead tokens per accept point
        self._lookahead_source = caps.lookahead_source  # the drafter's part that drafts by PaSS
        self._cost_model = cost_model
        self._learn_costs = cost_model is None  # a given cost model stays as given (deterministic K)
        self._prior_alpha = prior_alpha
        self.calibration_key = calibration_key
        self._calibration: Calibration | None = None
        self._seqs: dict[int, _Sequence] = {}
        self.last_round = RoundTiming()
        self._policy: AdaptiveK | None = None  # the round's K for adaptive sequences
        self._next_id = 0
        if caps.own_model and drafter.lm.vocab_size != self.target.vocab_size:
            raise ValueError(
                f"draft vocabulary ({drafter.lm.vocab_size} ids) does not match the target's "
                f"({self.target.vocab_size} ids): a drafter must share the target's tokenizer"
            )

    # -- requests -------------------------------------------------------------------------
    def validate(self, request: GenerationRequest) -> list[int]:
        """Checks every field; returns the prompt's token ids."""
        check_request_fields(request, self.max_draft_tokens)
        if request.prompt_ids is not None:
            ids = list(request.prompt_ids)
            if any(not 0 <= i < self.target.vocab_size for i in ids):
                raise InvalidRequest("prompt_ids", f"ids must lie in [0, {self.target.vocab_size})")
        elif request.messages is not None:
            ids = self.tokenizer.encode_messages([{"role": m.role, "content": m.content} for m in request.messages])
        else:
            ids = self.tokenizer.encode_chat(request.prompt) if self.chat_template else self.tokenizer.encode(request.prompt)
        field = "messages" if request.messages is not None else "prompt"
        if not ids:
            raise InvalidRequest(field, "encodes to no tokens")
        if len(ids) >= self.target.max_context:
            raise InvalidRequest(
                field, f"is {len(ids)} tokens, the model's context holds {self.target.max_context} (prompt + output)"
            )
        if self.max_prompt_tokens is not None and len(ids) > self.max_prompt_tokens:
            raise InvalidRequest(field, f"is {len(ids)} tokens, over the limit serve.limits.max_prompt_tokens "
                                        f"({self.max_prompt_tokens})")
        if request.max_new_tokens > self.target.max_context:
            raise InvalidRequest("max_new_tokens", f"must be at most the model's context ({self.target.max_context}), "
                                                   f"got {request.max_new_tokens}")
        return ids

    def add_request(self, request: GenerationRequest, prompt_ids: list[int] | None = None) -> int:
        ids = self.validate(request) if prompt_ids is None else prompt_ids
        seq_id, self._next_id = self._next_id, self._next_id + 1
        adaptive = request.num_draft_tokens is None and self.num_draft_tokens == "adaptive" and self.drafter
        if adaptive:
            _ = self.prior_alpha  # measured now, not inside a round
        self._seqs[seq_id] = _Sequence(
            seq_id, request, ids, make_generator(request.sampling.seed), self.target.new_cache(), {} if adaptive else None
        )
        return seq_id

    def abort(self, seq_id: int) -> None:
        """Drops a sequence and frees its caches on both sides."""
        s = self._seqs.pop(seq_id, None)
        if s is not None:
            self.target.release(s.cache)
        if self.drafter:
            self.drafter.release(seq_id)

    def reset_target(self, target) -> None:
        """After the target failed (its caches are lost): drops every sequence, frees their drafts,
        and runs the next rounds on `target` (the same model, rebuilt)."""
        for seq_id in list(self._seqs):
            del self._seqs[seq_id]
            if self.drafter:
                self.drafter.release(seq_id)
        self.target = target

    @property
    def sequences(self) -> int:
        """Sequences the engine holds (running or finished and not yet collected)."""
        return len(self._seqs)

    def has_unfinished(self) -> bool:
        return any(s.result is None for s in self._seqs.values())

    def generate(self, requests: Iterable[GenerationRequest]) -> list[GenerationResult]:
        requests = list(requests)
        prompts = [self.validate(r) for r in requests]  # all or nothing: no half-added batch
        ids = [self.add_request(r, p) for r, p in zip(requests, prompts)]
        results: dict[int, GenerationResult] = {}
        while self.has_unfinished():
            for out in self.step():
                if out.result is not None:
                    results[out.seq_id] = out.result
        return [results[i] for i in ids]

    # -- one round ------------------------------------------------------------------------
    def step(self) -> list[StepOutput]:
        """One round: admit, propose, verify (prompt chunks ride in the same forward), accept,
        then commit and emit per sequence."""
        active = [s for s in self._seqs.values() if s.result is None]
        if not active:
            return []
        chunks, joining = self._admit([s for s in active if len(s.uncached) > 1])
        seqs = [s for s in active if len(s.uncached) == 1] + joining
        timing = RoundTiming(batch=len(seqs))
        blocks = self._propose(seqs, timing)
        verified, prefilling = self._verify(seqs, blocks, chunks, timing)
        if not seqs:
            self.last_round = timing
            return []
        results = self._accept(seqs, blocks, [o.scores for o in verified], timing)
        if self._policy is not None and self._learn_costs and not prefilling:  # real rounds refine the costs
            # nothing is padded: the round cost what its tokens in all cost (as round_cost_s reads it)
            tokens = len(seqs) + sum(len(b) + (len(b) + 1) * b.lookahead for b in blocks)
            self._policy.cost = self._policy.cost.observed(len(seqs), tokens, timing.verify_s + timing.sample_s)
        outputs = [self._commit(s, block, result, out, timing)
                   for s, block, result, out in zip(seqs, blocks, results, verified)]
        self.last_round = timing
        return outputs

    def _propose(self, seqs: list[_Sequence], timing: RoundTiming) -> list[DraftBlock]:
        """Each sequence's draft block (empty at K = 0), from one propose_many call."""
        adaptive, draft_token_s = self._adaptive_shapes(seqs)
        shapes = [self._choose_shape(s, adaptive.get(s.seq_id, ())) for s in seqs]
        requests = [self._draft_request(s, shape) for s, shape in zip(seqs, shapes) if shape]
        t = self.clock()
        proposed = iter(self.drafter.propose_many(requests) if requests else [])
        timing.draft_s = self.clock() - t
        blocks = [next(proposed) if shape else _NO_DRAFT for shape in shapes]
        if self.lookahead and not self._fused_pays(seqs, blocks):  # PaSS as the paper's alternating calls
            blocks = [replace(b, lookahead=0) if b.lookahead and len(b) else b for b in blocks]
        # real chain rounds refine the draft cost (when every drafting sequence was priced by adaptive K)
        if (requests and self._learn_costs and not self.lookahead and all(not r.max_nodes for r in requests)
                and all(s.seq_id in adaptive for s, shape in zip(seqs, shapes) if shape)):
            free = self.capabilities.free_sources
            priced = sum(len(shape) for s, shape in zip(seqs, shapes) if shape and s.source not in free) * draft_token_s
            self._policy.cost = self._policy.cost.observed_draft(priced, timing.draft_s)
        for s, shape in zip(seqs, shapes):
            s.stats.draft_s += timing.draft_s / len(requests) if shape else 0.0
        return blocks

    def _draft_request(self, s: _Sequence, shape: Shape) -> DraftRequest:
        """A chain of K (max_nodes 0), or a tree: its template, depth and budget."""
        seed = 0 if s.request.sampling.greedy else draw_seed(s.generator)
        tree = not is_chain(shape)
        return DraftRequest(s.seq_id, s.tokens, shape_depth(shape), s.request.sampling, seed, *self._unsent_features(s),
                            max_nodes=len(shape) if tree else 0, max_branch=max_fanout(shape) if tree else 1,
                            shape=shape if tree else None)

    def _fused_pays(self, seqs: list[_Sequence], blocks: list[DraftBlock]) -> bool:
        """PaSS, fused or alternating: a round that verifies K drafts and appends a look-ahead
        block of n after each of its K + 1 accept points (one call yields 1 + E tokens, E the
        expected accepted drafts), or, as in the paper, calls that only draft ([last] + one block:
        one token) alternating with calls that only verify (1 + E tokens). Whichever the measured
        costs at this batch size say gives more tokens per second."""
        pass_blocks = [(s, b) for s, b in zip(seqs, blocks) if b.lookahead and len(b)]
        if not pass_blocks:
            return True
        cost = self._policy.cost if self._policy is not None else self._cost_model or (
            self._calibration.cost if self._calibration is not None else None)
        if cost is None:  # nothing measured yet (never inside a round): fused
            return True
        per_seq = cost.at_batch(len(seqs)).verify_s
        k = sum(len(b) for _, b in pass_blocks) / len(pass_blocks)
        n = sum(b.lookahead for _, b in pass_blocks) / len(pass_blocks)
        alphas = [self._tracker(s, s.source).alpha if s.trackers is not None and s.source else self.prior_alpha
                  for s, _ in pass_blocks]
        gained = sum(sum(a ** i for i in range(1, len(b) + 1)) for a, (_, b) in zip(alphas, pass_blocks)) / len(alphas)
        fused = (1 + gained) / verify_cost(per_seq, 1, 1 + k + (k + 1) * n)
        alternating = (2 + gained) / (verify_cost(per_seq, 1, 1 + n) + verify_cost(per_seq, 1, 1 + k))
        return fused >= alternating

    def _lookahead_ids(self, block: DraftBlock) -> list[int]:
        """The look-ahead tokens a PaSS block asks for: [LA]_1..[LA]_L (ids V..V+L-1) per accept point."""
        if not block.lookahead:
            return []
        return list(range(self.target.vocab_size, self.target.vocab_size + block.lookahead)) * (len(block) + 1)

    def _unsent_features(self, s: _Sequence) -> tuple[torch.Tensor | None, int]:
        """The features a reading drafter has not seen yet, and the position of the first."""
        if not s.features:
            return None, s.features_sent
        block, start = torch.cat(s.features), s.features_sent
        s.features, s.features_sent = [], start + len(block)
        return block, start

    def _verify(self, seqs: list[_Sequence], blocks: list[DraftBlock], chunks: list[tuple[_Sequence, list[int]]],
                timing: RoundTiming) -> tuple[list[TargetOutput], bool]:
        """One target call: each sequence's uncached tokens and drafts, scored at its last K_i + 1
        positions (logits [K_i + 1, V], or argmax ids [K_i + 1] for greedy sequences), and the
        prompt chunks, which return nothing. With a drafter that reads the target, the hidden
        states of every new position come too (a chunk's are committed at once). Returns each
        sequence's output and whether the round prefilled."""
        t = self.clock()
        heads = [s.uncached for s in seqs]
        ahead = [self._lookahead_ids(b) for b in blocks]  # PaSS: look-ahead tokens after each accept point
        inputs = [h + b.token_ids + a for h, b, a in zip(heads, blocks, ahead)] + [ids for _, ids in chunks]
        trees = [_layout(len(h), b.parents) if not a else _lookahead_layout(len(h), len(b), b.lookahead)
                 for h, b, a in zip(heads, blocks, ahead)]
        outputs = self.target.forward_outputs(
            [s.cache for s in seqs] + [s.cache for s, _ in chunks], inputs,
            argmax_only=[s.request.sampling.greedy for s in seqs] + [True] * len(chunks),
            last=[len(b) + 1 + len(a) for b, a in zip(blocks, ahead)] + [0] * len(chunks),
            parents=trees + [None] * len(chunks) if any(t is not None for t in trees) else None,
            hidden=[len(x) for x in inputs] if self.reads_features else None,
        )
        outputs = [_split_lookahead(o, len(b), b.lookahead) if a else o
                   for o, b, a in zip(outputs, blocks, ahead)] + outputs[len(seqs):]
        for (s, _), o in zip(chunks, outputs[len(seqs) :]):
            if o.hidden is not None:
                s.features.append(o.hidden)
        forward_s = self.clock() - t
        prompt_tokens = [len(ids) for _, ids in chunks] + [len(h) - 1 for h in heads]  # prefilled, not verified
        share = sum(prompt_tokens) / (sum(prompt_tokens) + len(seqs) + sum(map(len, blocks)))
        timing.prefill_s, timing.verify_s = forward_s * share, forward_s * (1 - share)
        per_token = timing.prefill_s / sum(prompt_tokens) if any(prompt_tokens) else 0.0
        for s, n in zip([s for s, _ in chunks] + seqs, prompt_tokens):
            s.stats.prefill_s += per_token * n
        for s, ids in chunks:
            s.cached += len(ids)
        for s, h in zip(seqs, heads):
            s.cached += len(h)  # the drafts are counted as they are accepted (_commit)
            s.stats.verify_s += timing.verify_s / len(seqs)
        return outputs[: len(seqs)], any(prompt_tokens)

    def _commit(self, s: _Sequence, block: DraftBlock, result: Acceptance, out: TargetOutput,
                timing: RoundTiming) -> StepOutput:
        """The target's cache keeps the accepted drafts (look-ahead tokens go with the rejected
        ones); stats, alpha and the drafter learn the outcome (after_round, where it asks); the
        tokens are emitted."""
        k, n, hidden = len(block), result.num_accepted, out.hidden
        if result.path is None:
            self.target.rollback(s.cache, k - n + (k + 1) * block.lookahead)
            if hidden is not None:  # [len(uncached) + k, d]: the committed positions' rows
                s.features.append(hidden[: len(hidden) - (k - n)])
        else:  # a tree: keep the accepted path's positions, gathered behind the committed ones
            self.target.keep(s.cache, list(range(s.cached)) + [s.cached + j for j in result.path])
            if hidden is not None:
                head = len(hidden) - k
                s.features.append(hidden[list(range(head)) + [head + j for j in result.path]])
        s.cached += n
        st = s.stats
        st.target_calls += 1
        st.rounds_k.append(k)
        st.tree_rounds += result.path is not None
        st.draft_tokens += k
        st.accepted_tokens += n
        rejected = not result.at_leaf if result.path is not None else n < k  # a draft was judged and refused
        st.evaluated_tokens += n + rejected
        if s.trackers is not None and s.source:
            self._tracker(s, s.source).update(n + rejected, n)
            if self.tree_nodes or self.lookahead:
                self._shapes_of(s.source).observe(block.parents, k, result.path or range(n))
        if self.capabilities.observes_rounds:
            # PaSS: the block after the last accepted token holds the drafts after this round's tokens
            rows = out.lookahead[n] if out.lookahead is not None and result.path is None else None
            self.drafter.after_round(RoundResult(s.seq_id, block, result, len(s.tokens) + len(result.tokens), out, rows))
        timing.draft_tokens += k
        timing.accepted_tokens += n
        return self._append(s, result.tokens)

    def _admit(self, waiting: list[_Sequence]) -> tuple[list[tuple[_Sequence, list[int]]], list[_Sequence]]:
        """This round's prompt tokens, prefill_chunk in all, oldest sequences first. A sequence whose
        whole uncached prompt fits joins the round's verification (its block starts with it and it
        drafts at once); the first that does not fit prefills a chunk of what is left."""
        budget, chunks, joining = self.prefill_chunk, [], []
        for s in waiting:
            rest = s.uncached
            if len(rest) <= budget:
                joining.append(s)
                budget -= len(rest)
            else:
                if budget:
                    chunks.append((s, rest[:budget]))
                break
        return chunks, joining

    def _adaptive_shapes(self, seqs: list[_Sequence]) -> tuple[dict[int, Shape], float]:
        """The draft shape of each adaptive sequence of the round. Nothing is padded, so each
        sequence gets its own: the allocation with the most expected tokens per second of the whole
        round at this batch size, a chain of K (K = 0 where a sequence's drafts would cost more than
        they yield), or with trees configured, a tree grown from its source's acceptance by depth and
        rank (a chain where side branches do not pay); with the policy's probes when every K sits
        at 0. Also the price of one paying draft token this round."""
        adaptive = [s for s in seqs if s.trackers is not None and s.request.num_draft_tokens is None]
        if not adaptive:
            return {}, 0.0
        if self._policy is None:
            self._policy = AdaptiveK(self.cost_model, self.max_draft_tokens)
        free = self.capabilities.free_sources
        for s in adaptive:
            if s.probes is None:
                s.probes = self._policy.new_schedule()
            s.source = self.drafter.source(s.seq_id, s.tokens)
        paying = sum(s.source not in free for s in adaptive)  # sequences a drafter with a cost drafts for
        per_token = self._policy.cost.draft_token_s(paying)
        # PaSS: a draft costs no draft step but its accept point's look-ahead block, L verified tokens
        lookahead_s = self.lookahead * self._policy.cost.at_batch(len(seqs)).token_s()
        draft_s = [0.0 if s.source in free else lookahead_s if s.source == self._lookahead_source else per_token
                   for s in adaptive]
        alphas = [self._tracker(s, s.source).alpha for s in adaptive]
        probes = [s.probes for s in adaptive]
        if self.tree_nodes:
            shapes = self._policy.next_trees(alphas, [self._shapes_of(s.source) for s in adaptive], probes, draft_s,
                                             self.tree_nodes, self.tree_branch)
        elif self.lookahead:  # PaSS: chains as long as the measured acceptance per look-ahead position pays
            shapes = self._policy.next_trees(alphas, [self._shapes_of(s.source) for s in adaptive], probes, draft_s,
                                             self.max_draft_tokens, 1)
        else:
            shapes = [default_shape(k) for k in self._policy.next_ks(alphas, probes, draft_s)]
        return dict(zip((s.seq_id for s in adaptive), shapes)), per_token

    def _shapes_of(self, source: str) -> ShapeStats:
        if source not in self._shape_stats:
            prior = self.capabilities.prior_by_depth if source == self._lookahead_source else None
            self._shape_stats[source] = ShapeStats(self.max_draft_tokens, max(1, self.tree_branch), self.prior_alpha,
                                                   prior_depth=prior)
        return self._shape_stats[source]

    def _tracker(self, s: _Sequence, source: str) -> AcceptanceTracker:
        """The sequence's alpha for drafts from `source` (lookup and a model accept differently)."""
        if source not in s.trackers:
            s.trackers[source] = AcceptanceTracker(prior_alpha=self.prior_alpha)
        return s.trackers[source]

    def _choose_shape(self, s: _Sequence, adaptive: Shape) -> Shape:
        """The sequence's draft shape: adaptive, the request's K, or the configured K (with the
        configured tree budget), cut to the tokens it may still emit and the context's room."""
        if self.drafter is None:
            return ()
        if s.request.num_draft_tokens is not None:
            shape = default_shape(s.request.num_draft_tokens, self.tree_nodes, self.tree_branch)
        elif s.trackers is not None:
            shape = adaptive
        else:
            shape = default_shape(int(self.num_draft_tokens), self.tree_nodes, self.tree_branch)
        remaining = s.request.max_new_tokens - len(s.output)
        depth = remaining - 1
        room = self.target.max_context - len(s.tokens)  # positions left for [last] + drafts (+ look-ahead blocks)
        if self.lookahead and s.source in (None, self._lookahead_source):  # PaSS drafts at most L, each with a block
            depth = min(depth, self.lookahead)
            room = (room - self.lookahead) // (1 + self.lookahead)
        return cut_shape(shape, max(0, depth), max(0, room - 1))

    def _accept(self, seqs: list[_Sequence], blocks: list[DraftBlock], scores: list[torch.Tensor],
                timing: RoundTiming) -> list[Acceptance]:
        """Per sequence the tokens it emits. Greedy sequences are decided from their argmax ids,
        the others by modified rejection sampling on their logits."""
        t = self.clock()
        out: list[Acceptance | None] = [None] * len(seqs)
        trees = [i for i, b in enumerate(blocks) if b.parents is not None]
        if trees:
            for i, result in zip(trees, self._accept_trees([seqs[i] for i in trees], [blocks[i] for i in trees],
                                                           [scores[i] for i in trees])):
                out[i] = result
        chains = [i for i, b in enumerate(blocks) if b.parents is None]
        greedy = [i for i in chains if seqs[i].request.sampling.greedy]
        sampled = [i for i in chains if not seqs[i].request.sampling.greedy]
        if greedy:
            result = greedy_accept(torch.cat([scores[i] for i in greedy]), _draft_ids([blocks[i] for i in greedy]),
                                   [len(blocks[i]) for i in greedy])
            for j, i in enumerate(greedy):
                out[i] = Acceptance(result.tokens(j), int(result.num_accepted[j]))
        if sampled:
            result = self._rejection_sample([seqs[i] for i in sampled], [blocks[i] for i in sampled],
                                            [scores[i] for i in sampled])
            for j, i in enumerate(sampled):
                out[i] = Acceptance(result.tokens(j), int(result.num_accepted[j]))
        timing.sample_s = self.clock() - t
        for s in seqs:
            s.stats.sample_s += timing.sample_s / len(seqs)
        return out

    @staticmethod
    def _accept_trees(seqs: list[_Sequence], blocks: list[DraftBlock], scores: list[torch.Tensor]) -> list[Acceptance]:
        """Tree blocks: the core's tree acceptance on argmax ids (greedy) or warped logits."""
        trees = [DraftTree(tuple(b.token_ids), b.parents, b.probs) for b in blocks]
        greedy = [s.request.sampling.greedy for s in seqs]
        rows = [x if g else warp_probs(x, [s.request.sampling] * len(x)) for x, g, s in zip(scores, greedy, seqs)]
        results = accept_trees(rows, trees, greedy, [s.generator for s in seqs])
        return [Acceptance(list(r.tokens), r.num_accepted, r.path, not t.children(r.path[-1] if r.path else -1))
                for r, t in zip(results, trees)]

    def _rejection_sample(self, seqs: list[_Sequence], blocks: list[DraftBlock], logits: list[torch.Tensor]):
        row_params = [s.request.sampling for s, b in zip(seqs, blocks) for _ in range(len(b) + 1)]
        p = warp_probs(torch.cat(logits), row_params)  # [T + B, V]
        q = None  # [T, V]
        if any(b.probs is not None for b in blocks):
            vocab = p.shape[1]
            q = torch.cat([
                b.probs if b.probs is not None
                else torch.nn.functional.one_hot(torch.tensor(b.token_ids, dtype=torch.long), vocab).float()
                for b in blocks
            ])
        return rejection_sample(p, _draft_ids(blocks), q, [len(b) for b in blocks], [False] * len(seqs),
                                [s.generator for s in seqs])

    def _append(self, s: _Sequence, tokens: list[int]) -> StepOutput:
        req, new, reason = s.request, [], None
        for t in tokens:
            if t == self.tokenizer.eos_token_id:
                reason = "eos"
                break
            s.output.append(t)
            new.append(t)
            if len(s.output) >= req.max_new_tokens or len(s.prompt_ids) + len(s.output) >= self.target.max_context:
                reason = "length"
                break
        ending = reason is not None or bool(req.stop) and self._stopped(s, new)
        text = self.tokenizer.decode(s.output) if ending else ""
        if req.stop and (cut := stop_at(text, req.stop)) is not None:  # where it is in the whole text
            text, reason = text[:cut], "stop"
        if reason is not None:
            s.result = GenerationResult(text, list(s.output), reason, s.stats, len(s.prompt_ids))
            self.abort(s.seq_id)
        return StepOutput(s.seq_id, new, s.result)

    def _stopped(self, s: _Sequence, new: list[int]) -> bool:
        """Whether a stop string now occurs in the output's text. No earlier round's text held one,
        so only a hit ending in text that changed can be new: the search starts a stop string's
        length before it (Detokenizer.changed), and the push decodes a bounded tail."""
        if s.text is None:
            s.text = Detokenizer(self.tokenizer.decode)
        d = s.text
        d.push(new)
        start = max(0, d.changed - max(map(len, s.request.stop)) + 1)
        d.forget(start)
        return stop_at(d.text_from(start), s.request.stop) is not None

    # -- costs for adaptive K ------------------------------------------------------------
    def prepare(self) -> None:
        """Takes (or loads) the one-time measurements adaptive K needs now rather than on the first request."""
        if self.drafter is not None and self.num_draft_tokens == "adaptive":
            _ = self.cost_model, self.prior_alpha

    @property
    def cost_model(self) -> CostModel:
        return self._cost_model or self._calibrated().cost

    @property
    def prior_alpha(self) -> float:
        """The acceptance rate new sequences start from (the drafter's, measured once)."""
        return self._prior_alpha if self._prior_alpha is not None else self._calibrated().prior_alpha

    def _calibrated(self) -> Calibration:
        if self._calibration is None:
            vocab = min(self.target.vocab_size, getattr(self.tokenizer, "vocab_size", self.target.vocab_size))

            def measure() -> Calibration:
                return Calibration(
                    measure_costs(self.target, self.drafter, vocab, self.max_draft_tokens, self.clock),
                    measure_agreement(self.target, self.drafter, self.tokenizer),
                )

            def recheck(cached: Calibration) -> Calibration | None:
                if self.drafter is None:
                    return None
                return recheck_draft_cost(cached, self.drafter, vocab, self.clock)

            self._calibration = load_or_measure(self.calibration_key, measure, recheck)
        return self._calibration
