"""`specserve build-corpus` and `specserve train-draft`: the command-line side of training drafts."""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, fields
from pathlib import Path

import torch

from ..speculation import InvalidRequest
from .train_head import HeadTraining
from .train_lookahead import LookaheadTraining
from .train_model import ModelTraining

TRAININGS = {"head": HeadTraining, "model": ModelTraining}  # train-draft KIND -> its settings


def add_parsers(sub) -> None:
    corpus = sub.add_parser("build-corpus", help="training text for drafts from local files and the target's own answers")
    corpus.add_argument("--out", required=True, help="the corpus file to write (JSONL)")
    corpus.add_argument("--config", default=None, help="YAML config (its target writes the answers)")
    corpus.add_argument("--local-tokens", type=int, default=400_000, help="tokens of local text (stdlib, package docs)")
    corpus.add_argument("--answers", type=int, default=600, help="prompts the target answers (chat, code, grounded)")
    corpus.add_argument("--max-new-tokens", type=int, default=256, help="per answer")
    corpus.add_argument("--batch", type=int, default=32, help="answers generated at once")
    corpus.add_argument("--seed", type=int, default=0)

    train = sub.add_parser("train-draft", help="train a draft for the config's target on a corpus (target frozen)")
    train.add_argument("kind", choices=list(TRAININGS), help="head: a feature-conditioned draft head (drafter head); "
                       "model: a standalone draft model (drafter trained)")
    train.add_argument("--corpus", required=True, help="from specserve build-corpus")
    train.add_argument("--out", required=True, help="the draft to write: a head file (draft.head.path) or a model "
                       "folder (draft.trained.path)")
    train.add_argument("--config", default=None, help="YAML config (its target is the one drafted for)")
    train.add_argument("--features", default=None,
                       help="cache of the target's features: read if it exists, else extracted and written here")
    train.add_argument("--window", type=int, default=256, help="tokens per training window")
    train.add_argument("--max-tokens", type=int, default=None, help="use at most this many corpus tokens")
    train.add_argument("--plot", default=None, metavar="OUT.png", help="loss and acceptance against steps")
    seen = {}
    for kind, training in TRAININGS.items():
        defaults = training()
        for f in fields(training):
            seen.setdefault(f.name, []).append(f"{getattr(defaults, f.name)} ({kind})")
    for kind, training in TRAININGS.items():
        for f in fields(training):
            if f.name in seen:
                train.add_argument(f"--{f.name.replace('_', '-')}", type=type(getattr(training(), f.name)), default=None,
                                   help="default " + ", ".join(seen.pop(f.name)))


    la = sub.add_parser("train-lookahead", help="train PaSS look-ahead embeddings for the config's target on a corpus "
                        "(target frozen; drafter pass)")
    la.add_argument("--corpus", required=True, help="from specserve build-corpus")
    la.add_argument("--out", required=True, help="the embeddings file to write (draft.pass.embeddings)")
    la.add_argument("--config", default=None, help="YAML config (its target is the one drafted for)")
    la.add_argument("--window", type=int, default=128, help="tokens per training window")
    la.add_argument("--max-tokens", type=int, default=None, help="use at most this many corpus tokens")
    la.add_argument("--plot", default=None, metavar="OUT.png", help="loss and acceptance against steps")
    defaults = LookaheadTraining()
    for f in fields(LookaheadTraining):
        la.add_argument(f"--{f.name.replace('_', '-')}", type=type(getattr(defaults, f.name)), default=getattr(defaults, f.name),
                        help=f"default {getattr(defaults, f.name)}")


def _positive(name: str, value) -> None:
    if value is not None and value <= 0:
        raise InvalidRequest(name, f"must be > 0, got {value}")


def build_corpus_command(config, args) -> int:
    from ..runtime.factory import load_target, make_engine
    from .corpus import build_corpus

    for name in ("local_tokens", "max_new_tokens", "batch"):
        _positive(name.replace("_", "-"), getattr(args, name))
    if args.answers < 0:
        _positive("answers", args.answers)
    target = load_target(config)
    engine = make_engine(config, target)
    start = time.perf_counter()
    report = build_corpus(engine, args.out, args.local_tokens, args.answers, args.max_new_tokens, args.batch, args.seed)
    print(f"wrote {args.out} in {time.perf_counter() - start:.0f} s:")
    print("\n".join(report.lines()))
    return 0


def _features(target, args) -> dict:
    from .corpus import read_corpus
    from .features import cut_windows, extract_features

    if args.features and Path(args.features).exists():
        data = torch.load(args.features, weights_only=True)
        print(f"features: {args.features} ({data['tokens'].numel():,} tokens)", file=sys.stderr)
        return data
    windows = cut_windows(read_corpus(args.corpus), args.window, args.max_tokens)
    data = extract_features(target, windows)
    if args.features:
        torch.save(data, args.features)
    return data


@torch.inference_mode()
def step_costs(target, draft, features: bool, context: int = 256, reps: int = 10) -> tuple[float, float]:
    """Seconds of one target decode step and one draft step at batch 1 after `context` tokens
    (features: the draft reads the target's hidden states, as a head does)."""
    from ..runtime.kv import CausalLM

    out = []
    d = target.config.hidden_size
    dtype = target.get_output_embeddings().weight.dtype
    for model, reads in ((target, False), (draft, features)):
        lm = CausalLM(model)
        cache = lm.new_cache()
        feats = (lambda n: [torch.zeros(n, d, dtype=dtype)]) if reads else (lambda n: None)
        lm.forward_outputs([cache], [[1] * context], last=[1], features=feats(context))
        for _ in range(2):
            lm.forward_outputs([cache], [[1]], features=feats(1))
        start = time.perf_counter()
        for _ in range(reps):
            lm.forward_outputs([cache], [[1]], features=feats(1))
        out.append((time.perf_counter() - start) / reps)
        lm.release(cache)
    return out[0], out[1]


def train_draft_command(config, args) -> int:
    from ..runtime.factory import load_target
    from .loop import plot

    for name in ("window", "max_tokens"):
        _positive(name.replace("_", "-"), getattr(args, name))
    training = TRAININGS[args.kind]
    names = {f.name for f in fields(training)}
    for other in {f.name for t in TRAININGS.values() for f in fields(t)} - names:
        if getattr(args, other) is not None:
            raise InvalidRequest(other.replace("_", "-"), f"is not a setting of train-draft {args.kind}")
    cfg = training(**{n: getattr(args, n) for n in names if getattr(args, n) is not None})
    for name in ("vocab", "layers", "steps", "batch", "lr", "eval_every", "eval_windows"):
        if name in names:
            _positive(name.replace("_", "-"), getattr(cfg, name))
    if getattr(cfg, "intermediate", 0) < 0:
        raise InvalidRequest("intermediate", f"must be >= 0 (0: the target's width), got {cfg.intermediate}")
    target = load_target(config)
    data = _features(target.model, args)
    dtype = target.model.get_output_embeddings().weight.dtype
    if args.kind == "head":
        from .train_head import train_head

        draft, log = train_head(target.model, data, cfg, args.out)
    else:
        from .train_model import train_model

        draft, log = train_model(target.model, target.tokenizer, data, cfg, args.out)
    draft = draft.to(dtype)
    if args.plot:
        plot(log, args.plot)
    target_s, draft_s = step_costs(target.model, draft, features=args.kind == "head")
    report = {
        "out": args.out, "kind": args.kind, "training": asdict(cfg), "seconds": round(log.seconds, 1),
        "train_tokens": int((~data["held_out"]).sum()) * data["tokens"].shape[1],
        "held_out_tokens": int(data["held_out"].sum()) * data["tokens"].shape[1],
        "held_out_loss": round(log.eval_loss[-1], 4), "greedy_agreement": round(log.agreement[-1], 4),
        "expected_acceptance_t1": round(log.expected_acceptance[-1], 4),
        "target_step_s": round(target_s, 5), "draft_step_s": round(draft_s, 5),
        "draft_vs_target_step": round(draft_s / target_s, 3),
    }
    print(json.dumps(report, indent=2))
    return 0


def train_lookahead_command(config, args) -> int:
    """specserve train-lookahead: the vectors, a report of acceptance per look-ahead position and
    what a look-ahead block adds to a target step."""
    from ..runtime.factory import load_target
    from .corpus import read_corpus
    from .features import cut_windows
    from .loop import plot
    from .train_lookahead import train_lookahead

    for name in ("window", "max_tokens", "lookahead", "steps", "batch", "anchors", "lr", "eval_every", "eval_windows"):
        _positive(name.replace("_", "-"), getattr(args, name))
    if args.objective not in ("distill", "tokens"):
        raise InvalidRequest("objective", f"must be distill or tokens, got {args.objective!r}")
    cfg = LookaheadTraining(**{f.name: getattr(args, f.name) for f in fields(LookaheadTraining)})
    target = load_target(config)
    windows = cut_windows(read_corpus(args.corpus), args.window, args.max_tokens)
    la, log, per_position = train_lookahead(target.model, windows.tokens, windows.held_out, cfg, args.out)
    if args.plot:
        plot(log, args.plot)
    from ..runtime.lookahead import install

    install(target.model, la)
    plain_s, with_block_s = lookahead_step_costs(target.model, cfg.lookahead)
    report = {
        "out": args.out, "training": asdict(cfg), "seconds": round(log.seconds, 1),
        "train_tokens": int((~windows.held_out).sum()) * windows.tokens.shape[1],
        "held_out_tokens": int(windows.held_out.sum()) * windows.tokens.shape[1],
        "held_out_loss": round(log.eval_loss[-1], 4), "held_out_loss_untrained": round(log.eval_loss[0], 4),
        "per_position": per_position,
        "target_step_s": round(plain_s, 5), "step_with_lookahead_block_s": round(with_block_s, 5),
    }
    print(json.dumps(report, indent=2))
    return 0


@torch.inference_mode()
def lookahead_step_costs(target, count: int, context: int = 256, reps: int = 10) -> tuple[float, float]:
    """Seconds of one decode step at batch 1 after `context` tokens, plain and with a block of
    `count` look-ahead tokens appended (what PaSS adds to a step that drafts nothing)."""
    from ..runtime.kv import CausalLM

    lm = CausalLM(target)
    cache = lm.new_cache()
    lm.forward_outputs([cache], [[1] * context], last=[1])
    out = []
    for extra in (0, count):
        ids = [1] + [lm.vocab_size + i for i in range(extra)]
        for rep in range(reps + 2):
            if rep == 2:
                start = time.perf_counter()
            lm.forward_outputs([cache], [ids], last=[len(ids)])
            lm.rollback(cache, len(ids))
        out.append((time.perf_counter() - start) / reps)
    lm.release(cache)
    return out[0], out[1]
