"""`specserve build-corpus` and `specserve train-draft`: the command-line side of training drafts."""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, fields
from pathlib import Path

import torch

from .train_head import HeadTraining


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
    train.add_argument("kind", choices=["head"], help="head: a feature-conditioned draft head")
    train.add_argument("--corpus", required=True, help="from specserve build-corpus")
    train.add_argument("--out", required=True, help="the draft file to write (draft.head.path)")
    train.add_argument("--config", default=None, help="YAML config (its target is the one drafted for)")
    train.add_argument("--features", default=None,
                       help="cache of the target's features: read if it exists, else extracted and written here")
    train.add_argument("--window", type=int, default=256, help="tokens per training window")
    train.add_argument("--max-tokens", type=int, default=None, help="use at most this many corpus tokens")
    train.add_argument("--plot", default=None, metavar="OUT.png", help="loss and acceptance against steps")
    defaults = HeadTraining()
    for f in fields(HeadTraining):
        train.add_argument(f"--{f.name.replace('_', '-')}", type=type(getattr(defaults, f.name)), default=None,
                           help=f"default {getattr(defaults, f.name)}")


def _positive(name: str, value) -> None:
    from ..speculation import InvalidRequest

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
def step_costs(target, head, context: int = 256, reps: int = 10) -> tuple[float, float]:
    """Seconds of one target decode step and one head draft step at batch 1 after `context` tokens."""
    from ..runtime.kv import CausalLM

    out = []
    for model, features in ((target, None), (head, True)):
        lm = CausalLM(model)
        cache = lm.new_cache()
        d = head.hidden_size
        feats = (lambda n: [torch.zeros(n, d, dtype=head.fc.weight.dtype)]) if features else (lambda n: None)
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
    from .train_head import plot, train_head

    for name in ("window", "max_tokens"):
        _positive(name.replace("_", "-"), getattr(args, name))
    chosen = {f.name: getattr(args, f.name) for f in fields(HeadTraining) if getattr(args, f.name) is not None}
    cfg = HeadTraining(**chosen)
    for name in ("vocab", "steps", "batch", "lr", "eval_every", "eval_windows"):
        _positive(name.replace("_", "-"), getattr(cfg, name))
    target = load_target(config)
    data = _features(target.model, args)
    head, log = train_head(target.model, data, cfg, args.out)
    head = head.to(target.model.get_output_embeddings().weight.dtype)
    if args.plot:
        plot(log, args.plot)
    target_s, head_s = step_costs(target.model, head)
    report = {
        "out": args.out, "training": asdict(cfg), "seconds": round(log.seconds, 1),
        "train_tokens": int((~data["held_out"]).sum()) * data["tokens"].shape[1],
        "held_out_tokens": int(data["held_out"].sum()) * data["tokens"].shape[1],
        "held_out_loss": round(log.eval_loss[-1], 4), "greedy_agreement": round(log.agreement[-1], 4),
        "expected_acceptance_t1": round(log.expected_acceptance[-1], 4),
        "target_step_s": round(target_s, 5), "head_step_s": round(head_s, 5), "head_vs_target_step": round(head_s / target_s, 3),
    }
    print(json.dumps(report, indent=2))
    return 0
