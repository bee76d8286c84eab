"""Writes the project-config part of helm/specserve/values.schema.json from cluster/config.py.

The chart's values.schema.json has two parts: its Kubernetes keys (written by hand) and the
project config keys (target, draft, speculation, cluster, serve) with their $defs, generated
here from the one validated schema (pydantic). tests/test_helm.py checks they are in sync.

    .venv/bin/python helm/sync_schema.py
"""

from __future__ import annotations

import json
from pathlib import Path

SCHEMA = Path(__file__).parent / "specserve" / "values.schema.json"
CONFIG_KEYS = ("target", "draft", "speculation", "cluster", "serve")


def _strip(node):
    """Drops pydantic's titles and defaults: Helm merges the chart's defaults before validating."""
    if isinstance(node, dict):
        return {k: _strip(v) for k, v in node.items() if k not in ("title", "default")}
    if isinstance(node, list):
        return [_strip(v) for v in node]
    return node


def synced(schema: dict) -> dict:
    from cluster.config import SpecserveConfig

    config = _strip(SpecserveConfig.model_json_schema())
    out = dict(schema)
    out["properties"] = dict(schema["properties"]) | {k: config["properties"][k] for k in CONFIG_KEYS}
    out["$defs"] = config["$defs"]
    return out


def render(schema: dict) -> str:
    return json.dumps(schema, indent=2) + "\n"


if __name__ == "__main__":
    SCHEMA.write_text(render(synced(json.loads(SCHEMA.read_text()))))
    print(f"wrote {SCHEMA}")
