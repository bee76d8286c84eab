"""`specserve generate`, `bench`, `serve`, `soak`, `build-corpus`, `train-draft` and `train-lookahead`."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

from .client import API_TOKEN_ENV
from .config import ConfigError, SpecserveConfig, load_config, parse_config
from .registry import DRAFTERS, SECOND_STAGES
from .speculation import InvalidRequest, SamplingParams


def _k_arg(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"num-draft-tokens must be an integer, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="specserve", description="Exact speculative decoding.")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="run one generation (locally, --distributed, or against --address)")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--max-new-tokens", type=int, default=128)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default)")
    gen.add_argument("--top-k", type=int, default=0, help="0: no truncation")
    gen.add_argument("--top-p", type=float, default=1.0, help="in (0, 1]; 1: no truncation")
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--num-draft-tokens", type=_k_arg, default=None, help="K; 0 is plain decoding; default: the config's")
    gen.add_argument("--drafter", default=None, help=f"{', '.join(DRAFTERS)}; default: the config's")
    gen.add_argument("--tree-nodes", type=int, default=None,
                     help="draft tree nodes a round (0: a chain; every built-in drafter drafts trees); "
                          "default: the config's speculation.tree.max_nodes")
    gen.add_argument("--second-stage", default=None, metavar="NAME|none",
                     help=f"speeds up a draft model's own decoding ({', '.join(SECOND_STAGES)}, or none); "
                          "default: the config's draft.second_stage")
    gen.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    gen.add_argument("--config", default=None, help="YAML config; default: the embedded default (configs/local.yaml)")
    gen.add_argument("--json", action="store_true", help="print one JSON object")
    gen.add_argument("--distributed", action="store_true",
                     help="run on Ray: tensor-parallel target, draft replicas, coordinator (the config's cluster section)")
    gen.add_argument("--address", default=None, metavar="HOST:PORT", help="a running service's gRPC endpoint")
    gen.add_argument("--stream", action="store_true", help="with --address: print tokens as they are accepted")
    gen.add_argument("--app", default="specserve", help="with --address: the Serve application's name")
    gen.add_argument("--timeout", type=float, default=None, help="with --address: the call's deadline in seconds")
    gen.add_argument("--token", default=os.environ.get(API_TOKEN_ENV),
                     help="with --address: the service's API token (default: env SPECSERVE_API_TOKEN)")
    gen.add_argument("--tls", action="store_true", help="with --address: dial with TLS (e.g. through the Ingress)")

    srv = sub.add_parser("serve", help="start a local Ray cluster and the service; stay up until interrupted")
    srv.add_argument("--config", default=None, help="YAML config; default: the embedded default (configs/local.yaml)")
    schema = SpecserveConfig().serve  # help states the schema's defaults, never copies of them
    srv.add_argument("--grpc-port", type=int, default=None,
                     help=f"default: the config's serve.grpc_port ({schema.grpc_port} in the embedded default)")
    srv.add_argument("--http-port", type=int, default=None,
                     help=f"default: the config's serve.http_port ({schema.http_port} in the embedded default)")

    soak = sub.add_parser("soak", help="many concurrent streams against a running service, with cancellations and "
                                       "deadlines; reports outcomes and p50/p99 latencies")
    soak.add_argument("--address", required=True, help="HOST:PORT of the gRPC API")
    soak.add_argument("--app", default="specserve", help="the Serve application (gRPC metadata)")
    soak.add_argument("--token", default=os.environ.get(API_TOKEN_ENV), help="API token (default: env SPECSERVE_API_TOKEN)")
    soak.add_argument("--tls", action="store_true", help="dial with TLS")
    soak.add_argument("--streams", type=int, default=64)
    soak.add_argument("--seconds", type=float, default=180.0)
    soak.add_argument("--max-new-tokens", type=int, default=48)
    soak.add_argument("--seed", type=int, default=0)
    soak.add_argument("--json", dest="json_out", default=None, metavar="OUT", help="write the report as JSON here")

    bench = sub.add_parser("bench", help="speculation off vs on, per drafter and K, on the project's prompts")
    bench.add_argument("--config", default=None)
    bench.add_argument("--json", dest="json_out", default=None, metavar="OUT", help="write rows as JSON here")
    bench.add_argument("--plot", default=None, metavar="OUT.png", help="speedup against K per drafter")
    bench.add_argument("--quick", action="store_true", help="a smaller run (under 3 minutes here)")
    bench.add_argument("--distributed", action="store_true",
                       help="the distributed path against the in-process engine: time per round, bytes, throughput under load")
    bench.add_argument("--concurrency", type=int, default=16, help="sequences at once in the --distributed load test")
    bench.add_argument("--drafters", default=None, metavar="A,B",
                       help="the in-process bench's drafters, comma-separated (default: every one the config can run)")
    bench.add_argument("--temperatures", default=None, metavar="T,T",
                       help="the in-process bench's temperatures (default: 0 with --quick, else 0,1)")
    bench.add_argument("--load", action="store_true",
                       help="prompts of 50-1,000 tokens at 1-64 concurrent sequences against the raw model forward, "
                            "and the served gRPC API against in process")
    bench.add_argument("--no-served", action="store_true", help="with --load: skip the served gRPC rows (no Ray)")

    quality = sub.add_parser("quality", help="held-out perplexity of the config's target in float32 and in int8 "
                                             "(the bench's texts); prints JSON")
    quality.add_argument("--config", help="YAML config (default: the embedded configs/local.yaml)")
    quality.add_argument("--max-tokens", type=int, default=512, help="tokens of each text scored (default %(default)s)")

    from .training.commands import add_parsers

    add_parsers(sub)
    return parser


def _temperatures(text: str | None) -> list[float] | None:
    if text is None:
        return None
    try:
        values = [float(t) for t in text.split(",")]
    except ValueError:
        raise InvalidRequest("temperatures", f"must be numbers separated by commas, got {text!r}") from None
    if any(not (t >= 0.0 and math.isfinite(t)) for t in values):
        raise InvalidRequest("temperatures", f"must be finite and >= 0, got {text!r}")
    return values


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "generate":
            return _remote_generate(args) if args.address else _generate(args)
        if args.command == "soak":
            return _soak(args)
        config = load_config(args.config)
        if args.command == "serve":
            return _serve(config, args)
        if args.command == "quality":
            if args.max_tokens < 2:
                raise InvalidRequest("max-tokens", f"must be at least 2, got {args.max_tokens}")
            from .runtime.quality import int8_quality

            print(json.dumps(int8_quality(config.target.model, args.max_tokens), indent=2))
            return 0
        if args.command in ("build-corpus", "train-draft", "train-lookahead"):
            from .training import commands

            run = {"build-corpus": commands.build_corpus_command, "train-draft": commands.train_draft_command,
                   "train-lookahead": commands.train_lookahead_command}[args.command]
            try:
                return run(config, args)
            except (ValueError, OSError) as e:  # a bad corpus, features or head file: said plainly
                print(f"specserve: {e}", file=sys.stderr)
                return 2
        if args.load:
            if args.plot or args.distributed:
                raise InvalidRequest("load", "--load runs in process and writes --json only (no --plot, --distributed)")
            from .bench_load import run_load_bench

            return run_load_bench(config, json_out=args.json_out, quick=args.quick, served=not args.no_served)
        if args.distributed or config.cluster.enabled:
            if args.plot:
                raise InvalidRequest("plot", "--plot draws the in-process bench; --distributed writes --json only")
            if args.concurrency < 1:
                raise InvalidRequest("concurrency", f"must be at least 1, got {args.concurrency}")
            from .bench_distributed import run_distributed_bench

            return run_distributed_bench(config, json_out=args.json_out, quick=args.quick, concurrency=args.concurrency)
        from .bench import run_bench

        drafters = args.drafters.split(",") if args.drafters else None
        return run_bench(config, json_out=args.json_out, plot=args.plot, quick=args.quick, drafters=drafters,
                         temperatures=_temperatures(args.temperatures))
    except InvalidRequest as e:
        print(f"specserve: invalid {e.field}: {e.message}", file=sys.stderr)
        return 2
    except ConfigError as e:
        print(f"specserve: bad config:\n{e}", file=sys.stderr)
        return 2


def _generate(args) -> int:
    import time

    from .runtime.requests import GenerationRequest, check_request_fields
    from .runtime.factory import check_drafter_name, load_target, make_engine

    sampling = SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    config = load_config(args.config)
    if args.tree_nodes is not None:
        data = config.model_dump()
        data["speculation"]["tree"]["max_nodes"] = args.tree_nodes
        try:
            config = parse_config(data, "--tree-nodes")
        except ConfigError as e:
            raise InvalidRequest("tree-nodes", f"must be in [0, 64], got {args.tree_nodes}") from e
    if args.second_stage is not None:
        if args.second_stage not in ("none", *SECOND_STAGES):
            raise InvalidRequest("second-stage", f"unknown second stage {args.second_stage!r}; choose one of "
                                 f"{', '.join(SECOND_STAGES)} or none")
        data = config.model_dump()
        data["draft"]["second_stage"] = args.second_stage
        if args.drafter is not None:
            data["draft"]["drafter"] = args.drafter
        try:
            config = parse_config(data, "--second-stage")
        except ConfigError as e:
            raise InvalidRequest("second-stage", str(e).splitlines()[-1].strip()) from e
    request = GenerationRequest(
        args.prompt, args.max_new_tokens, sampling, num_draft_tokens=args.num_draft_tokens, stop=tuple(args.stop)
    )
    check_request_fields(request, config.speculation.max_draft_tokens)  # before loading any model
    if args.drafter is not None:
        check_drafter_name(args.drafter, config.draft)
    distributed = args.distributed or config.cluster.enabled
    if distributed:
        from .launcher import DistributedEngine

        if args.drafter is not None:
            config = config.model_copy(update={"draft": config.draft.model_copy(update={"drafter": args.drafter})})
        engine = DistributedEngine(config)  # measures step costs for adaptive K while starting
        _print_dtype(config, engine.info["dtype"])
    else:
        target = load_target(config)
        _print_dtype(config, target.dtype)
        engine = make_engine(config, target, drafter=args.drafter)
        engine.prepare()  # one-time measurements for adaptive K, outside the timing below

    try:
        start = time.perf_counter()
        result = engine.generate([request])[0]
        seconds = time.perf_counter() - start
        rounds = engine.stats()["per_round"] if distributed else None
    finally:
        if distributed:
            engine.shutdown()
    stats = result.stats.as_dict()
    if rounds is not None:
        stats["per_round"] = {k: round(v, 5) if isinstance(v, float) else v for k, v in rounds.items()}
    stats["tokens_per_s"] = round(len(result.token_ids) / seconds, 2) if seconds > 0 else None
    if args.json:
        print(json.dumps({
            "text": result.text,
            "token_ids": result.token_ids,
            "finish_reason": result.finish_reason,
            "prompt_tokens": result.prompt_tokens,
            "stats": stats,
        }))
    else:
        print(result.text)
        print(
            f"[{len(result.token_ids)} tokens, {result.finish_reason}, {stats['tokens_per_s']} tokens/s, "
            f"{stats['target_calls']} target calls, {stats['accepted_tokens']}/{stats['draft_tokens']} drafts accepted]",
            file=sys.stderr,
        )
    return 0


def _print_dtype(config, chosen: str) -> None:
    print(f"specserve: target {config.target.model} in {chosen} (target.dtype: {config.target.dtype})",
          file=sys.stderr, flush=True)


class _Stop(BaseException):
    """Ctrl-C or SIGTERM reached `specserve serve`: unwinds whatever it was doing (loading too)."""


def _serve(config, args) -> int:
    import signal

    from .config import parse_config

    data = config.model_dump()
    for key, value in (("grpc_port", args.grpc_port), ("http_port", args.http_port)):
        if value is not None:
            data["serve"][key] = value
    config = parse_config(data, "serve options")  # the ports are checked like the config's own
    from . import app

    app.http_options(config)  # serve.tls files exist, before anything starts

    def stop(signum, frame):
        # once: the clean-up that follows is not interrupted again (it is bounded: Serve, then Ray)
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)
        raise _Stop

    def on_signals():
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, stop)

    on_signals()  # from the first moment: loading may take minutes
    import ray

    try:
        _run_service(config, app, ray, on_signals)
    except _Stop:
        pass
    finally:
        print("specserve: shutting down", file=sys.stderr, flush=True)
        try:
            if ray.is_initialized():
                from ray import serve

                serve.shutdown()
        finally:
            ray.shutdown()  # stops the local Ray it started: no process, port or shared memory left
    return 0


def _run_service(config, app, ray, on_signals) -> None:
    import threading

    from ray import serve

    from .launcher import check_resources

    s = config.serve
    ray.init(address=config.cluster.address, include_dashboard=False, log_to_driver=False)
    on_signals()  # again: Ray's core worker installs a SIGTERM handler of its own that aborts the process
    check_resources(config, ray.cluster_resources())
    print(f"specserve: starting {config.target.model} (tp_size {config.cluster.tp_size}, drafter "
          f"{config.draft.drafter}); models load before the endpoints answer", file=sys.stderr, flush=True)
    app.start(config)
    _print_dtype(config, serve.get_deployment_handle("engine", s.app_name).health.remote().result()["dtype"])
    scheme = "https" if s.tls else "http"
    print(f"specserve: serving\n  gRPC  localhost:{s.grpc_port}  (specserve.v1.SpeculativeGeneration, "
          f"metadata application={s.app_name}; plaintext: TLS for gRPC goes in front, docs/operations.md)\n"
          f"  HTTP  {scheme}://localhost:{s.http_port}/v1/chat/completions  (health: /healthz)\n"
          f"  try:  specserve generate --address localhost:{s.grpc_port} --prompt \"Hello\"\n"
          + ("  auth: an API token is required (env SPECSERVE_API_TOKEN is set)\n" if os.environ.get(API_TOKEN_ENV) else "")
          + "Ctrl-C stops it.", flush=True)
    threading.Event().wait()  # until a signal raises _Stop


def _soak(args) -> int:
    from .client import Client
    from .soak import SoakPlan, run_soak

    for name in ("streams", "seconds", "max_new_tokens"):
        if not getattr(args, name) > 0:
            raise InvalidRequest(name, f"must be positive, got {getattr(args, name)}")
    client = Client(args.address, args.app, token=args.token, tls=args.tls)
    plan = SoakPlan(streams=args.streams, seconds=args.seconds, max_new_tokens=args.max_new_tokens, seed=args.seed)
    print(f"specserve: soak: {plan.streams} streams for {plan.seconds:g} s against {args.address}", file=sys.stderr, flush=True)
    report = run_soak(client, plan).as_dict()
    client.close()
    print(json.dumps(report, indent=2))
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(report, f, indent=2)
    return 0


def _remote_generate(args) -> int:
    import grpc

    from .client import Client, proto_request

    if args.distributed or args.drafter or args.config:
        raise InvalidRequest("address", "--address talks to a running service: --distributed, --drafter and --config "
                             "are the server's")
    client = Client(args.address, args.app, args.timeout, token=args.token, tls=args.tls)
    request = proto_request(args.prompt, args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.seed,
                            args.num_draft_tokens, args.stop)
    token_ids, text, result = [], "", None
    try:
        if args.stream:
            for result in client.stream(request):
                token_ids += result.token_ids
                text += result.text
                if not args.json:
                    print(result.text, end="", flush=True)
            if not args.json:
                print()
        else:
            result = client.generate(request)
            token_ids, text = list(result.token_ids), result.text
            if not args.json:
                print(result.text)
    except grpc.RpcError as e:
        if e.code() == grpc.StatusCode.INVALID_ARGUMENT and ": " in e.details():
            raise InvalidRequest(*e.details().split(": ", 1)) from None
        print(f"specserve: {args.address}: {e.code().name}: {e.details()}", file=sys.stderr)
        return 1
    finally:
        client.close()
    stats = {"target_calls": result.stats.target_calls, "draft_tokens": result.stats.draft_tokens,
             "accepted_tokens": result.stats.accepted_tokens}
    if args.json:
        print(json.dumps({"text": text, "token_ids": token_ids, "finish_reason": result.finish_reason,
                          "prompt_tokens": result.prompt_tokens, "stats": stats}))
    else:
        print(f"[{len(token_ids)} tokens, {result.finish_reason}, {stats['target_calls']} target calls, "
              f"{stats['accepted_tokens']}/{stats['draft_tokens']} drafts accepted]", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
