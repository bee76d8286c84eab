"""The Ray Serve application: build_app(config) for `specserve serve`, `serve run
specserve.cluster.app:build_app`, tests and a RayService's serveConfigV2 (its `args` are the config itself).

  clients --gRPC :9000 / HTTP :8000--> Gateway --handle--> Engine (coordinator + TP target group)
                                                              --gRPC--> DraftServer replicas
"""

from __future__ import annotations

from pathlib import Path

from .config import ConfigError, SpecserveConfig, load_config, parse_config

GRPC_SERVICER = "specserve.v1.generation_pb2_grpc.add_SpeculativeGenerationServicer_to_server"
_METRICS_INTERVAL_S = 1.0
_LOOK_BACK_S = 5.0


def config_from_args(args) -> SpecserveConfig:
    """A SpecserveConfig, the config as a dict, {"config": "path.yaml"}, or nothing (the default)."""
    if isinstance(args, SpecserveConfig):
        return args
    if not args:
        return load_config(None)
    if isinstance(args, dict) and set(args) == {"config"} and isinstance(args["config"], (str, Path)):
        return load_config(args["config"])
    return parse_config(args, "serve args")


def _autoscaling(a, policy: dict | None = None, target_ongoing: float | None = None) -> dict:
    out = {"min_replicas": a.min_replicas, "max_replicas": a.max_replicas, "initial_replicas": a.min_replicas,
           "upscale_delay_s": a.upscale_delay_s, "downscale_delay_s": a.downscale_delay_s,
           "metrics_interval_s": _METRICS_INTERVAL_S, "look_back_period_s": _LOOK_BACK_S}
    if target_ongoing is not None:
        out["target_ongoing_requests"] = target_ongoing
    if policy is not None:
        out["policy"] = policy
    return out


def build_app(args=None):
    from ray import serve  # noqa: F401 - the deployments below need Serve

    from specserve.actors.gateway import Gateway
    from specserve.actors.serving import DraftServer, Engine

    config = config_from_args(args)
    data = config.model_dump()
    c, s = config.cluster, config.serve
    drafts = None
    if c.draft_replicas:
        drafts = DraftServer.options(
            name="drafts",
            ray_actor_options=c.draft_replica.options(),
            autoscaling_config=_autoscaling(s.drafts, policy={
                # loaded by Serve's controller by name (nothing imports cluster/autoscaling.py directly)
                "policy_function": "specserve.cluster.autoscaling:DraftReplicaPolicy",
                "policy_kwargs": {"target_sequences": s.drafts.target},
            }),
        ).bind(data)

    engine = Engine.options(
        name="engine",
        ray_actor_options=c.engine_host.options(),  # the coordinator and target rank 0 in one process
        placement_group_bundles=[c.engine_host.bundle()] + [c.target_rank.bundle()] * (c.tp_size - 1),
        placement_group_strategy="STRICT_PACK",
        max_ongoing_requests=s.max_ongoing_requests,
        max_queued_requests=s.max_queued_requests,
        autoscaling_config=_autoscaling(s.engines, target_ongoing=s.engines.target),
        health_check_period_s=10,  # Engine.check_health: unhealthy once its target cannot be rebuilt
        health_check_timeout_s=30,
    ).bind(data, drafts)
    return Gateway.options(
        name="gateway", ray_actor_options={"num_cpus": 0},
        max_ongoing_requests=4 * s.max_ongoing_requests + s.max_queued_requests,
    ).bind(engine, data)


def grpc_options(config: SpecserveConfig):
    from ray.serve.config import gRPCOptions

    return gRPCOptions(port=config.serve.grpc_port, grpc_servicer_functions=[GRPC_SERVICER])


def http_options(config: SpecserveConfig) -> dict:
    """Serve's HTTP proxy: host and port, and TLS from serve.tls (files checked here, naming the field)."""
    s = config.serve
    out = {"host": s.host, "port": s.http_port}
    if s.tls is not None:
        for field in ("cert_file", "key_file"):
            path = Path(getattr(s.tls, field))
            if not path.is_file():
                raise ConfigError(f"serve.tls.{field}: no such file: {path}")
        out |= {"ssl_certfile": str(Path(s.tls.cert_file).resolve()), "ssl_keyfile": str(Path(s.tls.key_file).resolve())}
    return out


def start(config: SpecserveConfig, blocking: bool = False):
    """Starts Serve's proxies (gRPC and HTTP ports from the config) and the app on the current Ray
    cluster; returns the ingress handle once every deployment is ready (models loaded)."""
    from ray import serve

    serve.start(http_options=http_options(config), grpc_options=grpc_options(config))
    # a route prefix is required: the gRPC proxy does not find an app deployed without one
    return serve.run(build_app(config), name=config.serve.app_name, route_prefix="/", blocking=blocking)


def free_port(low: int = 20000, high: int = 32000) -> int:
    """A TCP port free right now on every address, below Linux's ephemeral range (32768 and up),
    which outgoing connections draw from: a port found by binding port 0 can be taken by one of
    them before the server binds it (a local Ray cluster opens many)."""
    import random
    import socket

    start = random.randrange(low, high)
    for port in [*range(start, high), *range(low, start)]:
        try:
            with socket.socket() as s4:
                s4.bind(("0.0.0.0", port))
            if socket.has_ipv6:
                with socket.socket(socket.AF_INET6) as s6:
                    s6.bind(("::", port))
            return port
        except OSError:
            continue
    raise OSError(f"no free TCP port in [{low}, {high})")
