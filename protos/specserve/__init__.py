"""specserve's public Python API.

    import specserve

    engine = specserve.build_engine(specserve.load_config(None))      # in process, the default model
    result = engine.generate([specserve.GenerationRequest("Hello", 32)])[0]

    client = specserve.Client("localhost:9000")                       # a running service (gRPC)
    app = specserve.build_app({"config": "configs/local.yaml"})       # the Ray Serve application

Names resolve on first use, so `import specserve` (and its generated gRPC stubs under
specserve.v1) loads neither torch nor Ray. Everything else in the repository is private plumbing.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "SpeculativeEngine": "specserve.cluster.runtime.engine",
    "GenerationRequest": "specserve.cluster.runtime.requests",
    "GenerationResult": "specserve.cluster.runtime.requests",
    "StepOutput": "specserve.cluster.runtime.requests",
    "ChatMessage": "specserve.cluster.runtime.requests",
    "SamplingParams": "specserve.cluster.speculation",
    "InvalidRequest": "specserve.cluster.speculation",
    "build_engine": "specserve.cluster.runtime.factory",
    "load_config": "specserve.cluster.config",
    "SpecserveConfig": "specserve.cluster.config",
    "Client": "specserve.cluster.client",
    "build_app": "specserve.cluster.app",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'specserve' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
