"""The key table of docs/configuration.md, rendered from the schema's defaults (cluster/config.py).

The defaults come from `SpecserveConfig()`; only the meanings are written here. tests/test_defaults.py
checks the doc holds exactly this table and that ROWS covers every key once.

    .venv/bin/python -m specserve.cluster.config_docs          # print the table
    .venv/bin/python -m specserve.cluster.config_docs --write  # rewrite it in docs/configuration.md
"""

from __future__ import annotations

import itertools
import re
import sys
from pathlib import Path

from pydantic import BaseModel

from .config import SpecserveConfig
from .registry import DRAFTER_NAMES, DRAFTERS, SECOND_STAGES

DOC = Path(__file__).resolve().parent.parent / "docs" / "configuration.md"
BEGIN = "<!-- begin generated table: .venv/bin/python -m specserve.cluster.config_docs --write (meanings: cluster/config_docs.py) -->"
END = "<!-- end generated table -->"


def _names(names) -> str:
    return ", ".join(f"`{n}`" for n in names)


_BESIDE = [n for n, k in DRAFTERS.items() if k.reads_target]
_STAGED = [n for n, k in DRAFTERS.items() if k.staged]

# (key, meaning): a key may group several with braces, `a.{b,c}`; its defaults then read `b / c`.
ROWS: tuple[tuple[str, str], ...] = (
    ("target.model", "a built-in (`smollm2-135m-instruct`, `tiny-llama`, `tiny-qwen2`) or a Hugging Face folder"),
    ("target.dtype", "`auto` (bfloat16 on GPUs; on CPUs the fastest format measured at first start, int8 only within "
                     "2% perplexity, see docs/design.md), `float32`, `bfloat16` or `int8` (CPU only: int8 weights per "
                     "output channel, activations per row, exact per row, see docs/design.md); for target and, unless "
                     "set, draft"),
    ("target.device", "`auto` picks CUDA when available, else CPU"),
    ("target.chat_template", "wrap a prompt as one user turn when the tokenizer has a template"),
    ("target.prefill_chunk", "prompt tokens prefilled per round, in the same forward as the running decodes"),
    ("draft.drafter", f"{_names(DRAFTER_NAMES)} (`cluster/registry.py`); a config that names none gets `ngram_head` "
                      "where it can run (a head ships for the target or `draft.head.path` names one, and "
                      f"`cluster.draft_replicas` is 0), else `ngram`; the ones that run beside the target "
                      f"({_names(_BESIDE)}) need `cluster.draft_replicas: 0`"),
    ("draft.model.{name,layers,dtype}", "the `model` drafter (it needs `name` or `layers`): a draft LM, or the "
                                        "target's layers kept (on SmolLM2 the best subset drops layers 16-17: "
                                        "configs/local.yaml); `dtype` `null`: the target's"),
    ("draft.ngram.{max_n,min_n}", "n-gram sizes tried, longest first"),
    ("draft.head.path", "the `head` and `ngram_head` drafters' head file; `null`: the one that ships for the target "
                        "(SmolLM2's)"),
    ("draft.ngram_head.min_n", "`ngram_head` and `ngram_pass`: the shortest repeated suffix lookup drafts from (up to "
                               "`draft.ngram.max_n`); the head (PaSS) drafts elsewhere"),
    ("draft.trained.{path,dtype}", "the `trained` drafter's folder (from `specserve train-draft model`); `dtype` "
                                   "`null`: the target's"),
    ("draft.pass.embeddings", "the `pass` and `ngram_pass` drafters' look-ahead embeddings (from `specserve "
                              "train-lookahead`); `null`: the ones that ship for the target (SmolLM2's)"),
    ("draft.pass.lookahead", "L: use the first L look-ahead embeddings of the file (`null`: all); PaSS drafts at most "
                             "L tokens a round"),
    ("draft.second_stage", f"{_names(SECOND_STAGES)}: prompt lookup guesses that a model drafter ({_names(_STAGED)}) "
                           "verifies in its own forward (exact; fewer draft forwards); other drafters refuse it"),
    ("speculation.num_draft_tokens", "K, or `adaptive`; 0 is plain decoding"),
    ("speculation.max_draft_tokens", "the largest K (adaptive and per request)"),
    ("speculation.tree.{max_nodes,max_branch}", "draft trees: nodes a round per sequence (0: a chain) and children "
                                                "per node, for drafters that draft trees (all built in); K bounds the "
                                                "depth"),
    ("cluster.enabled", "run distributed (same as `--distributed`)"),
    ("cluster.address", "Ray cluster to join (`auto`, `ray://host:port`); `null` starts a local one"),
    ("cluster.tp_size", "tensor-parallel ranks (one actor each, packed on one node); must divide the heads"),
    ("cluster.target_rank.{cpus,gpus,threads}", "Ray resources and torch threads per rank; `gpus: 1` selects CUDA "
                                                "and NCCL"),
    ("cluster.draft_replicas", "draft replica actors (for model drafters: int8, layer subsets, a separate draft "
                               "model); 0 runs the drafter inside the coordinator, which is what the n-gram drafter "
                               "wants: it drafts in microseconds, and a replica's gRPC hop cost 2.3 ms a round and 10% "
                               "of served 16-stream throughput"),
    ("cluster.draft_replica.{cpus,gpus,threads}", "per replica"),
    ("cluster.coordinator.{cpus,gpus,threads}", "the coordinator; its process also runs target rank 0, so it reserves "
                                                "these plus one rank's resources and runs with the rank's threads (its "
                                                "own `threads` is then unused)"),
    ("cluster.{target_rank,draft_replica,coordinator}.resources", "custom Ray resources each actor needs (pins it to "
                                                                  "nodes that have them; the chart sets them)"),
    ("cluster.draft_timeout_s", "a replica slower than this is treated as failed (its sequences move; it rejoins once "
                                "it answers)"),
    ("cluster.draft_idle_s", "a draft replica frees a sequence not drafted for this long (its engine may have died); "
                             "an engine that comes back to it resends the context whole"),
    ("cluster.collective_timeout_s", "a tensor-parallel collective (inside a forward) that waits longer fails the "
                                     "target group, which the engine rebuilds (docs/operations.md); ranks waiting for "
                                     "the next call never time out"),
    ("cluster.draft_tls", "mutual TLS on the internal draft channel: `{ca_file, cert_file, key_file, server_name: "
                          "specserve-draft}` (PEM files on every engine and replica pod; replicas present a "
                          "certificate for `server_name` and admit only clients the CA signed)"),
    ("serve.tls", "`{cert_file, key_file}`: the HTTP API over HTTPS (gRPC TLS goes in front of Serve's proxy: the "
                  "chart's Ingress)"),
    ("serve.app_name", "the Serve application; gRPC clients send metadata `(\"application\", name)`"),
    ("serve.{grpc_port,http_port,host}", "Serve's proxies (`--grpc-port`, `--http-port`)"),
    ("serve.max_new_tokens", "when a request asks for 0 (gRPC) or omits `max_tokens` (HTTP)"),
    ("serve.max_ongoing_requests", "sequences one engine replica batches at once"),
    ("serve.max_queued_requests", "requests waiting for an engine; beyond it RESOURCE_EXHAUSTED / 503"),
    ("serve.engines.{min_replicas,max_replicas,target,upscale_delay_s,downscale_delay_s}",
     "engine replicas, scaled on ongoing requests per replica; the delays: how long a scaling decision must hold"),
    ("serve.drafts.{min_replicas,max_replicas,target,upscale_delay_s,downscale_delay_s}",
     "draft replicas, scaled on sequences held per replica; the delays as for engines"),
    ("serve.draft_refresh_s", "how often an engine looks for new or gone draft replicas"),
    ("serve.limits.max_prompt_tokens", "prompt tokens a request may send (`null`: the model's context less one); "
                                       "applied by the engine, in process too"),
    ("serve.limits.max_new_tokens", "the most a request may ask for (never above the model's context either)"),
    ("serve.limits.{max_stop_strings,max_stop_chars}", "stop strings per request, characters per stop string"),
    ("serve.limits.max_request_bytes", "a gRPC request message or an HTTP body (1 MiB)"),
)


def _is_section(field) -> bool:
    return isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)


def leaves(model: BaseModel | None = None, prefix: str = "") -> dict[str, object]:
    """Every key of the schema, dotted as in YAML (`draft.pass.lookahead`), with its default."""
    model = SpecserveConfig() if model is None else model
    out: dict[str, object] = {}
    for name, field in type(model).model_fields.items():
        key, value = prefix + (field.alias or name), getattr(model, name)
        out |= leaves(value, key + ".") if _is_section(field) else {key: value}
    return out


def flatten(data: dict, prefix: str = "") -> dict[str, object]:
    """A config mapping's keys dotted like leaves(): nested mappings open until a schema key."""
    known, out = leaves(), {}
    for k, v in data.items():
        key = prefix + str(k)
        out |= flatten(v, key + ".") if isinstance(v, dict) and key not in known else {key: v}
    return out


def expand(pattern: str) -> list[str]:
    """`a.{b,c}.d` -> [`a.b.d`, `a.c.d`], in order."""
    parts = [p.split(",") if i % 2 else [p] for i, p in enumerate(re.split(r"\{([^}]*)\}", pattern))]
    return ["".join(combo) for combo in itertools.product(*parts)]


def render_value(value) -> str:
    """A default as the table writes it: numbers bare, the rest as YAML in backticks."""
    if isinstance(value, bool) or value is None:
        return f"`{'null' if value is None else str(value).lower()}`"
    if isinstance(value, (int, float)):
        return f"{value:g}" if isinstance(value, float) else str(value)
    return f"`{value}`"


def row_problems(rows=ROWS) -> list[str]:
    """Keys of the schema no row names, keys named twice, and names that are no key."""
    named = [k for pattern, _ in rows for k in expand(pattern)]
    known = leaves()
    return ([f"no row for {k}" for k in known if k not in named]
            + [f"{k} named twice" for k in sorted({k for k in named if named.count(k) > 1})]
            + [f"{k} is not a schema key" for k in named if k not in known])


def render(rows=ROWS) -> str:
    problems = row_problems(rows)
    if problems:
        raise ValueError("cluster/config_docs.py ROWS: " + "; ".join(problems))
    defaults = leaves()
    lines = ["| key | default | meaning |", "|---|---|---|"]
    for pattern, meaning in rows:
        values = [render_value(defaults[k]) for k in expand(pattern)]
        shown = values[0] if len(set(values)) == 1 else " / ".join(values)
        lines.append(f"| `{pattern}` | {shown} | {meaning} |")
    return "\n".join(lines) + "\n"


def with_table(doc: str, table: str) -> str:
    """The doc with the text between its markers replaced by the table."""
    head, rest = doc.split(BEGIN + "\n", 1)
    _, tail = rest.split(END, 1)
    return f"{head}{BEGIN}\n{table}{END}{tail}"


if __name__ == "__main__":
    if sys.argv[1:] == ["--write"]:
        DOC.write_text(with_table(DOC.read_text(), render()))
        print(f"wrote {DOC}")
    else:
        sys.stdout.write(render())
