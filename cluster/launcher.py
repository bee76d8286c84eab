"""The distributed shape from a config: start or join Ray, then one coordinator actor, which
creates the tensor-parallel target group and the draft replicas. `DistributedEngine` has the
local engine's generate(), so the CLI and the bench drive either the same way."""

from __future__ import annotations

from typing import Iterable, Iterator

from .config import ConfigError, SpecserveConfig
from .runtime.requests import GenerationRequest, GenerationResult, StepOutput, check_request_fields
from .speculation import InvalidRequest, Unavailable


def check_resources(config: SpecserveConfig, available: dict[str, float]) -> None:
    """The shape must fit the Ray cluster, or actors would wait forever: a clear error instead."""
    c = config.cluster
    need = c.required()
    what = {
        "CPU": "tp_size x target_rank.cpus + draft_replicas x draft_replica.cpus + coordinator.cpus",
        "GPU": "tp_size x target_rank.gpus + draft_replicas x draft_replica.gpus + coordinator.gpus",
    }
    for kind, amount in need.items():
        have = available.get(kind, 0.0)
        if amount > have + 1e-9:
            raise ConfigError(f"cluster: the shape needs {amount:g} {kind} ({what[kind]}); the Ray cluster has {have:g}")


class DistributedEngine:
    def __init__(self, config: SpecserveConfig):
        import ray

        from specserve.actors.coordinator import CoordinatorActor

        self.config = config
        c = config.cluster
        self._started_ray = not ray.is_initialized()
        if self._started_ray:
            ray.init(address=c.address, include_dashboard=False, log_to_driver=False)
        try:
            check_resources(config, ray.cluster_resources())
            self.coordinator = CoordinatorActor.options(**c.engine_host.options()).remote(
                config.model_dump()
            )
            self.info = _get(self.coordinator.ready.remote())
        except BaseException:
            self._stop_ray()
            raise

    def generate(self, requests: Iterable[GenerationRequest], max_in_flight: int | None = None) -> list[GenerationResult]:
        """Results in request order. max_in_flight: keep at most that many submitted at a time
        (a closed loop of clients: a finished request makes room for the next)."""
        import ray

        requests = list(requests)
        for r in requests:  # all or nothing: no half-submitted batch
            check_request_fields(r, self.config.speculation.max_draft_tokens)
        limit = max_in_flight or len(requests)
        refs, pending = {}, []
        for i, r in enumerate(requests):
            if len(pending) >= limit:
                _, pending = ray.wait(pending, num_returns=1)
            refs[i] = self.coordinator.generate.remote(r)
            pending.append(refs[i])
        return _get([refs[i] for i in range(len(requests))])

    def stream(self, request: GenerationRequest) -> Iterator[StepOutput]:
        check_request_fields(request, self.config.speculation.max_draft_tokens)
        for ref in self.coordinator.stream.options(num_returns="streaming").remote(request):
            yield _get(ref)

    def stats(self) -> dict:
        return _get(self.coordinator.stats.remote())

    def reset_stats(self) -> None:
        _get(self.coordinator.reset_stats.remote())

    def shutdown(self) -> None:
        import ray

        try:
            _get(self.coordinator.shutdown.remote())
            ray.kill(self.coordinator)
        finally:
            self._stop_ray()

    def _stop_ray(self) -> None:
        import ray

        if self._started_ray:
            ray.shutdown()


def _get(refs):
    """ray.get, with a request error raised as itself (it names the bad field)."""
    import ray
    from ray.exceptions import RayTaskError

    try:
        return ray.get(refs)
    except RayTaskError as e:
        if isinstance(e.cause, (InvalidRequest, ConfigError, ValueError, Unavailable)):
            raise e.cause from None
        raise
