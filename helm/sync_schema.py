"""Writes the project-config part of helm/specserve/values.schema.json from cluster/config.py.

The chart's values.schema.json has two parts: its Kubernetes keys (written by hand) and the
project config keys (target, draft, speculation, cluster, serve) with their $defs, generated
here from the one validated schema (pydantic). tests/test_helm.py checks they are in sync.

The chart's values.yaml holds the schema's defaults for the config keys, but for CHART_SHAPE, the
chart's deployment shape; tests/test_defaults.py checks values.yaml against both (differences()).

    .venv/bin/python helm/sync_schema.py
"""

from __future__ import annotations

import json
from pathlib import Path

SCHEMA = Path(__file__).parent / "specserve" / "values.schema.json"
CONFIG_KEYS = ("target", "draft", "speculation", "cluster", "serve")
VALUES = SCHEMA.with_name("values.yaml")

# Config keys whose chart value differs from the schema's default, and why (the values live in values.yaml).
CHART_SHAPE = {
    "draft.drafter": "ngram runs on the draft replicas; the head drafters run only beside the target",
    "cluster.target_rank.cpus": "target pods on GPU nodes have CPUs to spare",
    "cluster.target_rank.gpus": "one GPU per tensor-parallel rank",
    "cluster.draft_replicas": "the chart renders a draft worker group",
    "cluster.draft_replica.cpus": "a whole CPU per draft replica pod slot",
    "cluster.coordinator.cpus": "a whole CPU beside rank 0",
    "serve.engines.max_replicas": "room to scale out",
    "serve.engines.upscale_delay_s": "pods take longer to start than local actors",
    "serve.engines.downscale_delay_s": "pods take longer to start than local actors",
    "serve.drafts.max_replicas": "room to scale out",
    "serve.drafts.upscale_delay_s": "pods take longer to start than local actors",
    "serve.drafts.downscale_delay_s": "pods take longer to start than local actors",
}


def _strip(node):
    """Drops pydantic's titles and defaults: Helm merges the chart's defaults before validating."""
    if isinstance(node, dict):
        return {k: _strip(v) for k, v in node.items() if k not in ("title", "default")}
    if isinstance(node, list):
        return [_strip(v) for v in node]
    return node


def synced(schema: dict) -> dict:
    from specserve.cluster.config import SpecserveConfig

    config = _strip(SpecserveConfig.model_json_schema())
    out = dict(schema)
    out["properties"] = dict(schema["properties"]) | {k: config["properties"][k] for k in CONFIG_KEYS}
    out["$defs"] = config["$defs"]
    return out


def differences(values: dict) -> dict[str, tuple]:
    """Config keys of a values mapping that differ from the schema's defaults: {key: (value, default)};
    a key the schema lacks reads (value, "not a schema key")."""
    from specserve.cluster.config_docs import flatten, leaves

    defaults = leaves()
    given = flatten({k: values[k] for k in CONFIG_KEYS if k in values})
    return {k: (v, defaults.get(k, "not a schema key")) for k, v in given.items()
            if k not in defaults or v != defaults[k]}


def render(schema: dict) -> str:
    return json.dumps(schema, indent=2) + "\n"


if __name__ == "__main__":
    SCHEMA.write_text(render(synced(json.loads(SCHEMA.read_text()))))
    print(f"wrote {SCHEMA}")
