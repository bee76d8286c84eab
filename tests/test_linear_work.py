"""Per-token work that does not grow with the output: streamed text and stop strings decode a
bounded tail (engine.Detokenizer), the n-gram drafter keeps an index (drafters.NgramIndex). Each
fast path is checked against the slow full-work reference it replaced, and the work each round
is counted, with the reference's growing count as the negative control."""

import random
import time
from types import SimpleNamespace

import pytest

from specserve.cluster.api import TextStream
from specserve.cluster.runtime.drafters import NgramDrafter
from specserve.cluster.runtime.engine import GenerationRequest, SpeculativeEngine, _Sequence
from specserve.cluster.runtime.tokenizer import ByteTokenizer

PIECES = ["a", "b", " ", "ab", "STOP", "\n", ".", "é", "ü", "€", "😀", "中文", "क्ष", "🤖🧠", " the", "ST", "OP", "'s", "  "]


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    from specserve.cluster.runtime.models import load_tokenizer

    return load_tokenizer("smollm2-135m-instruct")


class Counting:
    """A tokenizer whose decode counts the tokens it decodes, call by call."""

    def __init__(self, tokenizer):
        self.tokenizer, self.eos_token_id, self.calls = tokenizer, tokenizer.eos_token_id, []

    def decode(self, ids):
        self.calls.append(len(ids))
        return self.tokenizer.decode(ids)


class FullDecodeStream:
    """The slow reference: TextStream as it was, decoding every id on every push."""

    def __init__(self, decode, stop=()):
        self.decode, self.hold, self.ids, self.sent = decode, max((len(s) for s in stop), default=1) - 1, [], 0

    def push(self, token_ids, final_text=None):
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


def full_decode_stop(tokenizer, output, stop):
    """The slow reference for stop strings: the whole output decoded, the first hit cut."""
    text = tokenizer.decode(output)
    hits = [i for i in (text.find(x) for x in stop) if i >= 0]
    return (text[: min(hits)], "stop") if hits else (text, None)


def random_ids(rng, tokenizer, hf: bool) -> list[int]:
    """Text of multi-byte characters and stop-like pieces, encoded; now and then ids no text
    encodes to (invalid or partial UTF-8 bytes, special and random vocabulary ids)."""
    ids = []
    for _ in range(rng.randint(1, 30)):
        if rng.random() < 0.85:
            ids += tokenizer.encode("".join(rng.choice(PIECES) for _ in range(rng.randint(1, 4))))
        elif hf:
            ids.append(rng.randrange(tokenizer.vocab_size))
        else:
            ids.append(rng.choice([0x80, 0xBF, 0xC3, 0xE2, 0xF0, 0xFF, 256]))
    return ids


def random_chunks(rng, ids):
    out, i = [], 0
    while i < len(ids):
        n = rng.choice([1, 1, 2, 3, 5])
        out.append(ids[i : i + n])
        i += n
    return out


def random_stop(rng, text):
    if rng.random() < 0.3 or len(text) < 2:
        return ()
    i = rng.randrange(len(text) - 1)
    picks = [text[i : i + rng.randint(1, 4)], rng.choice(PIECES)]
    return tuple(s for s in picks if s)[: rng.randint(1, 2)]


def _tokenizers(smollm2_tokenizer):
    return [(ByteTokenizer(), False), (smollm2_tokenizer, True)]


# -- streamed text ------------------------------------------------------------------------
def test_stream_deltas_equal_the_full_decode_ones(smollm2_tokenizer):
    """Push for push, the same deltas as decoding every id every time, for both tokenizers; and
    they concatenate to the final text."""
    rng = random.Random(0)
    for tokenizer, hf in _tokenizers(smollm2_tokenizer):
        for _ in range(300):
            ids = random_ids(rng, tokenizer, hf)
            full = tokenizer.decode(ids)
            stop = random_stop(rng, full)
            fast, slow = TextStream(tokenizer.decode, stop), FullDecodeStream(tokenizer.decode, stop)
            chunks = random_chunks(rng, ids)
            got = [fast.push(c) for c in chunks[:-1]]
            assert got == [slow.push(c) for c in chunks[:-1]], (ids, stop)
            got.append(fast.push(chunks[-1], final_text=full))
            assert "".join(got) == full


def test_stream_decodes_a_bounded_tail_each_push():
    """Tokens decoded a push stay bounded over 3000 pushes; the full-decode reference (negative
    control) decodes every id every push, so its count grows with the output."""
    rng = random.Random(1)
    ids = ByteTokenizer().encode("".join(rng.choice(PIECES) for _ in range(1500)))[:3000]
    per_push = {}
    for name, stream_type in (("fast", TextStream), ("full", FullDecodeStream)):
        tok = Counting(ByteTokenizer())
        stream = stream_type(tok.decode, ("STOP!",))
        counts = []
        for t in ids:
            before = sum(tok.calls)
            stream.push([t])
            counts.append(sum(tok.calls) - before)
        per_push[name] = counts
    fast, full = per_push["fast"], per_push["full"]
    assert max(fast) <= 16 and sum(fast[-500:]) <= sum(fast[:500]) * 1.5
    assert full[-1] == len(ids) and sum(full) > 100 * sum(fast)  # the negative control grows


# -- stop strings in the engine ----------------------------------------------------------
class _Host:
    """What SpeculativeEngine._emit reads of its engine: a tokenizer, the context bound, abort."""

    _emit = SpeculativeEngine._emit
    _stopped = SpeculativeEngine._stopped

    def __init__(self, tokenizer):
        self.tokenizer, self.target = tokenizer, SimpleNamespace(max_context=10**9)

    def abort(self, seq_id):
        pass


def _sequence(stop, max_new=10**9):
    return _Sequence(0, GenerationRequest("x", max_new, stop=stop), [1], None, None, None, None)


def test_stop_strings_cut_where_the_full_decode_cuts(smollm2_tokenizer):
    """Round by round, the same round finishes with the same text as when the whole output is
    decoded and searched every round, for both tokenizers."""
    rng = random.Random(2)
    for tokenizer, hf in _tokenizers(smollm2_tokenizer):
        host = _Host(tokenizer)
        for _ in range(300):
            ids = [t for t in random_ids(rng, tokenizer, hf) if t != tokenizer.eos_token_id]
            stop = random_stop(rng, tokenizer.decode(ids)) or ("STOP",)
            s, output, want = _sequence(stop), [], None
            for chunk in random_chunks(rng, ids):
                output += chunk
                text, reason = full_decode_stop(tokenizer, output, stop)
                got = host._emit(s, chunk).result
                if reason is not None:
                    want = (text, reason)
                    break
                assert got is None, (ids, stop)
            assert (got.text, got.finish_reason) == want if want else got is None, (ids, stop)


def test_stop_strings_decode_a_bounded_tail_each_round():
    """With a stop string that never occurs, tokens decoded a round stay bounded over 3000
    rounds; the full-decode reference (negative control) decodes the whole output each round."""
    rng = random.Random(3)
    ids = ByteTokenizer().encode("".join(rng.choice(PIECES) for _ in range(1500)))[:3000]
    tok = Counting(ByteTokenizer())
    host, s = _Host(tok), _sequence(("never here",))
    fast, full = [], []
    for t in ids:
        before = sum(tok.calls)
        assert host._emit(s, [t]).result is None
        fast.append(sum(tok.calls) - before)
        before = sum(tok.calls)
        full_decode_stop(tok, s.output, s.request.stop)
        full.append(sum(tok.calls) - before)
    assert max(fast) <= 16 and sum(fast[-500:]) <= sum(fast[:500]) * 1.5
    assert full[-1] == len(ids) and sum(full) > 100 * sum(fast)


# -- the n-gram drafter ---------------------------------------------------------------------
def _contexts(rng, vocab, n):
    """Contexts as rounds leave them: grown by a few tokens, cut back (a rejected draft), one token
    rewritten, or a context and a drafted path (the second stage)."""
    contexts = [[rng.randrange(vocab) for _ in range(rng.randint(0, 6))] for _ in range(n)]
    for _ in range(120):
        c = rng.choice(contexts)
        op = rng.random()
        if op < 0.6:
            c += [rng.randrange(vocab) for _ in range(rng.randint(1, 5))]
        elif op < 0.8:
            del c[max(0, len(c) - rng.randint(1, 6)):]
        elif op < 0.9 and c:
            c[rng.randrange(len(c))] = rng.randrange(vocab)
        else:
            yield [*c, *(rng.randrange(vocab) for _ in range(rng.randint(1, 4)))]
            continue
        yield c if rng.random() < 0.7 else tuple(c)


@pytest.mark.parametrize("vocab", [2, 3, 8, 1000])  # repetitive to random
def test_ngram_proposals_equal_the_scan(vocab):
    """match, lookup and tree equal the whole-context scan (NgramDrafter.scan_match / scan_tree) on
    interleaved contexts that grow, are cut back or rewritten, with windows and index counts
    small enough to force rebuilds and evictions."""
    rng = random.Random(vocab)
    for trial in range(40):
        max_n = rng.randint(1, 4)
        d = NgramDrafter(max_n=max_n, min_n=rng.randint(1, max_n), window=rng.choice([1, 3, 64]),
                         max_contexts=rng.choice([1, 2, 64]))
        for c in _contexts(rng, vocab, rng.randint(1, 4)):
            assert d.match(c) == d.scan_match(c), (c, d.max_n, d.min_n)
            k = rng.randint(0, 6)
            start = d.scan_match(c) if k else None
            assert d.lookup(c, k) == ([] if start is None else c[start : start + k])
            shape = (rng.randint(0, 5), rng.randint(0, 10), rng.randint(1, 3))
            fast, slow = d.tree(c, *shape), d.scan_tree(c, *shape)
            assert (fast.token_ids, fast.parents) == (slow.token_ids, slow.parents), (c, shape)


class _Reads(list):
    """A context that counts the Python reads of it (an index or a slice is one read)."""

    reads = 0

    def __getitem__(self, key):
        _Reads.reads += 1
        return super().__getitem__(key)


def test_ngram_work_a_round_does_not_grow_with_the_context():
    """One token a round for 2000 rounds, no repeat (the scan's worst case): the n-grams the index
    adds and its reads of the context stay constant a round; the scan's reads (negative control)
    grow with the context."""
    d = NgramDrafter(max_n=3, min_n=1)
    context = _Reads(range(10))
    index = d.index(context)
    ops, fast, slow = [], [], []
    for t in range(10, 2010):
        context.append(t)
        before, _Reads.reads = index.ops, 0
        assert d.match(context) is None
        fast.append(_Reads.reads)
        ops.append(index.ops - before)
        _Reads.reads = 0
        assert d.scan_match(context) is None
        slow.append(_Reads.reads)
    assert d.index(context) is index  # found again every round, never rebuilt
    assert max(fast) == min(fast) and set(ops) == {3}  # the new n-grams of sizes 1..3
    assert slow[-1] > 100 * fast[-1] and slow[-1] > 5 * slow[0]


def test_ngram_rounds_index_only_their_new_tokens():
    """A round that adds m tokens adds at most m n-grams of each size, however long the context."""
    rng, d = random.Random(5), NgramDrafter(max_n=3, min_n=1)
    context = [rng.randrange(50) for _ in range(100)]
    index = d.index(context)
    for _ in range(300):
        m = rng.randint(1, 9)
        before = index.ops
        context += [rng.randrange(50) for _ in range(m)]
        d.match(context)
        assert d.index(context) is index and index.ops - before <= 3 * m


def test_ngram_drafts_are_priced_by_measurement():
    """No source of the n-gram drafter is free: adaptive K charges it the draft step calibration
    measures, as for every drafter (a few microseconds)."""
    from specserve.cluster.runtime import calibration

    d = NgramDrafter()
    assert d.free_sources == frozenset()
    ctx = [(7 * i + 3) % 258 for i in range(48)]
    assert 0 < calibration._draft_step_s(d, 1, ctx, 258, 3, time.perf_counter) < 1e-2
