"""python -m specserve.cluster.gpu_check --out DIR [--cpu] [--device auto] [--parts a,b] [--limit NAME=S] [--time-scale F]
(what scripts/gpu-check.sh runs). Exit 0: every part that ran passed; 1: a part failed or timed out;
2: bad arguments."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .common import Context
from .runner import BY_NAME, PARTS, Plan, run_check, run_in_process


def build_parser() -> argparse.ArgumentParser:
    parts = "\n".join(f"  {p.name:15} {p.summary}" for p in PARTS)
    parser = argparse.ArgumentParser(
        prog="gpu-check.sh", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Checks specserve on this machine's GPU: exactness, distributions, costs, speed, the served "
                    "path; writes DIR/report.json and DIR/report.txt.", epilog=f"parts:\n{parts}")
    parser.add_argument("--out", required=True, type=Path, help="the report folder (created)")
    parser.add_argument("--cpu", action="store_true", help="the dry run: the same parts on the CPU, tiny models, small sizes")
    parser.add_argument("--device", default="auto",
                        help="the target's device as the config's target.device reads it (auto: cuda when available)")
    parser.add_argument("--parts", default=None, help="comma-separated parts to run (default: all; environment always runs)")
    parser.add_argument("--limit", action="append", default=[], metavar="NAME=SECONDS",
                        help="override one part's time limit (repeatable)")
    parser.add_argument("--time-scale", type=float, default=1.0,
                        help="multiply every part's limit and the total budget (a slow or shared machine)")
    parser.add_argument("--part", default=None, help=argparse.SUPPRESS)  # internal: run one part in this process
    parser.add_argument("--deadline", type=float, default=None, help=argparse.SUPPRESS)
    return parser


def parse_limits(items: list[str]) -> dict[str, float]:
    out = {}
    for item in items:
        name, _, seconds = item.partition("=")
        if name not in BY_NAME:
            raise ValueError(f"--limit {item}: unknown part {name!r}; parts: {', '.join(BY_NAME)}")
        try:
            out[name] = float(seconds)
        except ValueError:
            raise ValueError(f"--limit {item}: seconds must be a number, got {seconds!r}") from None
        if out[name] < 0:
            raise ValueError(f"--limit {item}: seconds must be >= 0")
    return out


def parse_parts(text: str | None) -> tuple[str, ...]:
    if text is None:
        return tuple(BY_NAME)
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    unknown = [n for n in names if n not in BY_NAME]
    if unknown or not names:
        raise ValueError(f"--parts: unknown part(s) {', '.join(unknown) or '(none given)'}; parts: {', '.join(BY_NAME)}")
    return names


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    mode = "cpu" if args.cpu else "gpu"
    if args.part is not None:
        return run_in_process(args.part, Context(mode, args.device, args.out.resolve(), args.deadline))
    try:
        if args.cpu and args.device not in ("auto", "cpu"):
            raise ValueError(f"--cpu runs on the CPU: --device {args.device} contradicts it")
        if not args.time_scale > 0:
            raise ValueError(f"--time-scale must be > 0, got {args.time_scale}")
        plan = Plan(args.out.resolve(), mode, args.device, parse_parts(args.parts), parse_limits(args.limit), args.time_scale)
    except ValueError as e:
        print(f"gpu-check: {e}", file=sys.stderr)
        return 2
    return run_check(plan)


if __name__ == "__main__":
    sys.exit(main())
