"""The one validated configuration schema. YAML only at the edge (load_config)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .heads import builtin_head
from .registry import BUILTIN_DRAFTERS, SECOND_STAGES, find, unusable

Dtype = Literal["auto", "float32", "bfloat16", "int8"]  # auto: bfloat16 on GPUs and CPUs with native bf16, else float32; int8: CPU, exact per row (runtime/int8.py)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, serialize_by_alias=True)  # `pass` (drafter pass) dumps as written


class TargetConfig(_Strict):
    model: str = "smollm2-135m-instruct"  # built-in name or a Hugging Face folder
    dtype: Dtype = "auto"
    device: str = "auto"  # auto: cuda when available, else cpu
    chat_template: bool = True  # wrap a prompt as one user turn when the tokenizer has a template
    prefill_chunk: int = Field(256, ge=1)  # prompt tokens prefilled per round, batched with the running decodes


class ModelDrafterConfig(_Strict):
    name: str | None = None  # built-in name or folder; None: the target's own weights
    layers: list[int] | None = None  # keep only these decoder layers (self-speculative draft)
    dtype: Dtype | None = None  # default: the target's

    @property
    def usable(self) -> bool:
        return self.name is not None or self.layers is not None


class NgramDrafterConfig(_Strict):
    max_n: int = Field(3, ge=1, le=16)
    min_n: int = Field(1, ge=1, le=16)

    @model_validator(mode="after")
    def _check(self):
        if self.min_n > self.max_n:
            raise ValueError(f"min_n ({self.min_n}) exceeds max_n ({self.max_n})")
        return self


class NgramHeadDrafterConfig(_Strict):
    min_n: int = Field(2, ge=1, le=16)  # shortest repeated suffix that lookup drafts from (head otherwise)


class HeadDrafterConfig(_Strict):
    path: str | None = None  # a head trained for the target (specserve train-draft head); None: the one shipped for it


class TrainedDrafterConfig(_Strict):
    path: str | None = None  # a folder from specserve train-draft model
    dtype: Dtype | None = None  # default: the target's


class PassDrafterConfig(_Strict):
    embeddings: str | None = None  # look-ahead embeddings (specserve train-lookahead); None: the ones shipped for the target
    lookahead: int | None = Field(None, ge=1, le=16)  # L: use the first L vectors of the file (None: all of them)


class DraftConfig(_Strict):
    # the drafter that runs: a name in cluster/registry.py (or a registered "module:attribute"); unset: see _default_drafter
    drafter: str = Field("ngram_head", json_schema_extra=lambda s: _builtin_drafters(s))
    model: ModelDrafterConfig = ModelDrafterConfig()  # settings of drafter 'model'
    ngram: NgramDrafterConfig = NgramDrafterConfig()  # settings of drafter 'ngram'
    head: HeadDrafterConfig = HeadDrafterConfig()  # settings of drafters 'head' and 'ngram_head'
    ngram_head: NgramHeadDrafterConfig = NgramHeadDrafterConfig()  # drafter 'ngram_head' (lookup sizes up to ngram.max_n)
    trained: TrainedDrafterConfig = TrainedDrafterConfig()  # drafter 'trained'
    pass_: PassDrafterConfig = Field(PassDrafterConfig(), alias="pass")  # drafter 'pass' (PaSS); key `pass` in YAML
    second_stage: Literal[("none", *SECOND_STAGES)] = "none"  # speeds up a draft model's own decoding (int8, model, trained)

    @field_validator("drafter")
    @classmethod
    def _known(cls, name: str) -> str:
        if find(name) is None:
            raise ValueError(unusable(name, None))
        return name

    @model_validator(mode="after")
    def _check(self):  # what the draft section alone decides (the registry's answer)
        if (reason := unusable(self.drafter, self)) is not None:
            raise ValueError(reason)
        return self


def _builtin_drafters(schema: dict) -> None:
    """The JSON schema (values.schema.json) of draft.drafter: the built-in names."""
    schema.pop("type", None)
    schema["enum"], schema["type"] = list(BUILTIN_DRAFTERS), "string"


class TreeConfig(_Strict):
    max_nodes: int = Field(0, ge=0, le=64)  # draft nodes a round per sequence; 0: a chain of K tokens
    max_branch: int = Field(2, ge=1, le=8)  # children per node at most


class SpeculationConfig(_Strict):
    num_draft_tokens: int | Literal["adaptive"] = "adaptive"  # K; 0 is plain decoding
    max_draft_tokens: int = Field(8, ge=1, le=32)  # upper bound for adaptive K and for requests
    tree: TreeConfig = TreeConfig()  # draft trees (drafters that propose them: all built in); K bounds their depth

    @model_validator(mode="after")
    def _check(self):
        k = self.num_draft_tokens
        if k != "adaptive" and not 0 <= k <= self.max_draft_tokens:
            raise ValueError(f"speculation.num_draft_tokens must be 'adaptive' or in [0, {self.max_draft_tokens}], got {k}")
        return self

    @property
    def block_nodes(self) -> int:
        """The most draft nodes a sequence's block can hold: a chain of max_draft_tokens or a tree of tree.max_nodes."""
        return max(self.max_draft_tokens, self.tree.max_nodes)


class ActorResources(_Strict):
    cpus: float = Field(1.0, ge=0)  # Ray num_cpus of each actor
    gpus: float = Field(0.0, ge=0)  # Ray num_gpus of each actor (CUDA and NCCL are used when > 0)
    threads: int = Field(1, ge=1)  # torch intra-op threads of each actor
    resources: dict[str, float] = {}  # custom Ray resources of each actor (pins it to nodes that have them)

    @model_validator(mode="after")
    def _check(self):
        for name, amount in self.resources.items():
            if name in ("CPU", "GPU", "memory") or amount < 0:
                raise ValueError(f"resources: {name!r}: custom Ray resources only (not CPU/GPU/memory), amounts >= 0")
        return self

    def options(self) -> dict:
        """Ray actor options: num_cpus, num_gpus and the custom resources."""
        return {"num_cpus": self.cpus, "num_gpus": self.gpus} | ({"resources": dict(self.resources)} if self.resources else {})

    def bundle(self) -> dict[str, float]:
        """One placement-group bundle that holds this actor."""
        return {"CPU": self.cpus} | ({"GPU": self.gpus} if self.gpus else {}) | self.resources


# Each role's defaults are its fields', so a partial section (`coordinator: {threads: 2}`) keeps the rest.
class TargetRankResources(ActorResources):
    threads: int = Field(2, ge=1)  # torch intra-op threads of each rank


class HelperResources(ActorResources):
    cpus: float = Field(0.25, ge=0)  # draft replicas and the coordinator: a quarter CPU each


class DraftTls(_Strict):
    """Mutual TLS on the internal draft channel: replicas serve with cert_file and admit only
    clients whose certificate ca_file signed; engines present the same kind of certificate."""

    ca_file: str  # PEM: the CA that signs the replicas' and the engines' certificates
    cert_file: str  # PEM: this process's certificate (replicas and engines alike)
    key_file: str  # PEM: its private key
    server_name: str = "specserve-draft"  # the name in the replicas' certificate (replicas are dialled by IP)


class ClusterConfig(_Strict):
    enabled: bool = False  # run on Ray (same as --distributed); false: one process
    address: str | None = None  # Ray cluster to join ("auto" or "ray://host:port"); None: start a local one
    tp_size: int = Field(1, ge=1)  # tensor-parallel ranks of the target (one actor each, one node)
    target_rank: TargetRankResources = TargetRankResources()  # per tensor-parallel rank
    draft_replicas: int = Field(0, ge=0)  # 0: the drafter runs inside the coordinator (n-gram: always best)
    draft_replica: HelperResources = HelperResources()
    coordinator: HelperResources = HelperResources()
    draft_timeout_s: float = Field(10.0, gt=0)  # a replica slower than this counts as failed
    draft_idle_s: float = Field(300.0, gt=0)  # a draft replica frees a sequence not drafted for this long (resent whole)
    collective_timeout_s: float = Field(600.0, gt=0)  # a tensor-parallel collective waiting longer fails the group
    draft_tls: DraftTls | None = None  # mutual TLS on the internal draft channel; None: plaintext inside the cluster

    @property
    def engine_host(self) -> ActorResources:
        """The coordinator's process, which also runs target rank 0 (its own torch threads are the rank's)."""
        c, r = self.coordinator, self.target_rank
        resources = {k: c.resources.get(k, 0) + r.resources.get(k, 0) for k in {**c.resources, **r.resources}}
        return ActorResources(cpus=c.cpus + r.cpus, gpus=c.gpus + r.gpus, threads=r.threads, resources=resources)

    def required(self) -> dict[str, float]:
        """Ray resources the whole shape reserves."""
        cpus = self.tp_size * self.target_rank.cpus + self.draft_replicas * self.draft_replica.cpus + self.coordinator.cpus
        gpus = self.tp_size * self.target_rank.gpus + self.draft_replicas * self.draft_replica.gpus + self.coordinator.gpus
        return {"CPU": cpus, "GPU": gpus}


class Autoscaling(_Strict):
    min_replicas: int = Field(1, ge=1)
    max_replicas: int = Field(1, ge=1)
    target: float = Field(16, gt=0)  # engines: requests per replica; drafts: sequences per replica
    upscale_delay_s: float = Field(5.0, ge=0)
    downscale_delay_s: float = Field(60.0, ge=0)

    @model_validator(mode="after")
    def _check(self):
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) exceeds max_replicas ({self.max_replicas})")
        return self


class DraftAutoscaling(Autoscaling):
    max_replicas: int = Field(2, ge=1)
    target: float = Field(8, gt=0)  # sequences per draft replica


class Limits(_Strict):
    """Caps on what one request may ask; beyond one: INVALID_ARGUMENT / HTTP 400 naming the cap."""

    max_prompt_tokens: int | None = Field(None, ge=1)  # None: the model's context less one
    max_new_tokens: int = Field(4096, ge=1)  # and never above the model's context
    max_stop_strings: int = Field(16, ge=0)
    max_stop_chars: int = Field(256, ge=1)  # characters per stop string
    max_request_bytes: int = Field(1 << 20, ge=1024)  # a gRPC request message or an HTTP body


class ServeTls(_Strict):
    """TLS on the public HTTP endpoint (Serve's HTTP proxy). Serve's gRPC proxy has no TLS: terminate
    gRPC TLS in front of it (the chart's Ingress)."""

    cert_file: str  # PEM certificate chain
    key_file: str  # PEM private key


class ServeConfig(_Strict):
    app_name: str = Field("specserve", min_length=1)  # gRPC clients send metadata ("application", app_name)
    grpc_port: int = Field(9000, ge=1, le=65535)
    http_port: int = Field(8000, ge=1, le=65535)
    host: str = "0.0.0.0"  # where the HTTP proxy listens
    max_new_tokens: int = Field(128, ge=1)  # when a request asks for 0
    max_ongoing_requests: int = Field(32, ge=1)  # sequences one engine replica batches at once
    max_queued_requests: int = Field(64, ge=0)  # waiting for an engine; beyond: RESOURCE_EXHAUSTED / HTTP 503
    engines: Autoscaling = Autoscaling()  # coordinator + tensor-parallel target groups
    drafts: DraftAutoscaling = DraftAutoscaling()  # draft replicas (cluster.draft_replicas 0: none)
    draft_refresh_s: float = Field(2.0, gt=0)  # how often an engine looks for new or gone draft replicas
    limits: Limits = Limits()  # per request (also in process: the engine applies max_prompt_tokens)
    tls: ServeTls | None = None  # HTTPS on http_port; None: plaintext HTTP

    @model_validator(mode="after")
    def _check_serve(self):
        if self.max_new_tokens > self.limits.max_new_tokens:
            raise ValueError(f"serve.max_new_tokens ({self.max_new_tokens}) exceeds serve.limits.max_new_tokens "
                             f"({self.limits.max_new_tokens})")
        return self


class SpecserveConfig(_Strict):
    target: TargetConfig = TargetConfig()
    draft: DraftConfig = DraftConfig()
    speculation: SpeculationConfig = SpeculationConfig()
    cluster: ClusterConfig = ClusterConfig()
    serve: ServeConfig = ServeConfig()

    @model_validator(mode="before")
    @classmethod
    def _default_drafter(cls, data):
        """draft.drafter unset: ngram_head where it can run (a head for the target, no draft replicas), else ngram."""
        draft = data.get("draft", {}) if isinstance(data, dict) else None
        if not isinstance(draft, dict) or "drafter" in draft:
            return data
        return {**data, "draft": {**draft, "drafter": _drafter_when_unset(data, draft)}}

    @model_validator(mode="after")
    def _check(self):  # with the target and the replicas known (the registry's answer)
        reason = unusable(self.draft.drafter, self.draft, self.target.model, draft_replicas=self.cluster.draft_replicas)
        if reason is not None:
            raise ValueError(reason)
        return self


def _section(data, key: str) -> dict:
    part = data.get(key)
    return part.model_dump() if isinstance(part, BaseModel) else part if isinstance(part, dict) else {}


def _drafter_when_unset(data: dict, draft: dict) -> str:
    """The schema's default drafter, ngram_head, where it can run; else ngram, which runs for any target."""
    model = _section(data, "target").get("model", TargetConfig.model_fields["model"].default)
    head = _section(draft, "head").get("path") or (isinstance(model, str) and builtin_head(model))
    return "ngram_head" if head and not _section(data, "cluster").get("draft_replicas") else "ngram"


class ConfigError(ValueError):
    pass


def parse_config(data: dict, source: str = "config") -> SpecserveConfig:
    try:
        return SpecserveConfig.model_validate(data or {})
    except ValidationError as e:
        lines = []
        for err in e.errors():
            where = ".".join(str(p) for p in err["loc"]) or "(top level)"
            msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
            lines.append(f"{source}: {where}: {msg}")
        raise ConfigError("\n".join(lines)) from None


# The embedded default is the schema's defaults; configs/local.yaml spells them out (tests/test_defaults.py).
DEFAULT_CONFIG = SpecserveConfig().model_dump()


def load_config(path: str | Path | None) -> SpecserveConfig:
    """A YAML file, or the embedded default (the schema's defaults, as in configs/local.yaml) when path is None."""
    if path is None:
        return parse_config({}, "embedded default")
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    with path.open() as f:
        data = yaml.safe_load(f)
    if data is not None and not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return parse_config(data, str(path))
