"""Defaults written once: the schema (cluster/config.py) holds every default, and the embedded default,
configs/local.yaml, the chart's values, docs/configuration.md and the CLI help agree with it."""

from __future__ import annotations

import argparse
import importlib.util
import re
from pathlib import Path

import pytest
import yaml

from specserve.cluster import config_docs
from specserve.cluster.config import DEFAULT_CONFIG, SpecserveConfig, load_config, parse_config
from specserve.cluster.registry import DRAFTER_NAMES

ROOT = Path(__file__).resolve().parent.parent
# loaded from its file, as tests/test_helm.py does (helm/ on sys.path would shadow `specserve`)
_spec = importlib.util.spec_from_file_location("sync_schema", ROOT / "helm" / "sync_schema.py")
sync_schema = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sync_schema)

DEFAULTS = SpecserveConfig()


def _nested(key: str, value) -> dict:
    """`a.b.c`, v -> {a: {b: {c: v}}}."""
    for part in reversed(key.split(".")):
        value = {part: value}
    return value


# -- the embedded default ----------------------------------------------------------------------------
def test_embedded_default_is_the_schema():
    assert load_config(None) == DEFAULTS == load_config(ROOT / "configs" / "local.yaml")
    assert DEFAULT_CONFIG == DEFAULTS.model_dump()
    assert (DEFAULTS.draft.drafter, DEFAULTS.target.model, DEFAULTS.target.dtype) == \
           ("ngram_head", "smollm2-135m-instruct", "auto")  # README's configuration table


@pytest.mark.parametrize("key", sorted(config_docs.leaves()))
def test_a_section_given_in_part_keeps_the_other_defaults(key):
    assert parse_config(_nested(key, config_docs.leaves()[key]), "test") == DEFAULTS


@pytest.mark.parametrize("data, drafter", [
    ({}, "ngram_head"),
    ({"target": {"model": "tiny-llama"}}, "ngram"),  # no head ships for it
    ({"cluster": {"draft_replicas": 1}}, "ngram"),  # ngram_head runs only beside the target
    ({"target": {"model": "tiny-llama"}, "draft": {"head": {"path": "h.pt"}}}, "ngram_head"),
    ({"draft": {"drafter": "model", "model": {"layers": [0, 1]}}}, "model"),
])
def test_a_config_naming_no_drafter_gets_the_default_where_it_runs(data, drafter):
    assert parse_config(data, "test").draft.drafter == drafter


# -- docs/configuration.md ---------------------------------------------------------------------------
def test_the_docs_table_covers_every_key_once():
    assert config_docs.row_problems() == []


def test_the_docs_table_is_rendered_from_the_schema():
    doc = config_docs.DOC.read_text()
    assert config_docs.with_table(doc, config_docs.render()) == doc, \
        "docs/configuration.md is stale: run .venv/bin/python -m specserve.cluster.config_docs --write"


def test_row_problems_name_missing_twice_and_unknown_keys():
    rows = (*config_docs.ROWS[1:], ("target.dtype", ""), ("target.colour", ""))
    assert config_docs.row_problems(rows) == ["no row for target.model", "target.dtype named twice",
                                              "target.colour is not a schema key"]


@pytest.mark.parametrize("value, shown", [(None, "`null`"), (True, "`true`"), (10.0, "10"), (0.25, "0.25"),
                                          (8, "8"), ("auto", "`auto`"), ({}, "`{}`")])
def test_defaults_render_as_yaml(value, shown):
    assert config_docs.render_value(value) == shown


def test_brace_groups_expand_in_order():
    assert config_docs.expand("a.{b,c}.{d,e}") == ["a.b.d", "a.b.e", "a.c.d", "a.c.e"]


# -- the chart's values ------------------------------------------------------------------------------
def test_chart_values_hold_the_schema_defaults_but_the_chart_shape():
    differences = sync_schema.differences(yaml.safe_load(sync_schema.VALUES.read_text()))
    unknown = {k for k, (_, default) in differences.items() if default == "not a schema key"}
    assert not unknown, f"values.yaml: not schema keys: {sorted(unknown)}"
    stale = {k: v for k, v in differences.items() if k not in sync_schema.CHART_SHAPE}
    assert not stale, f"values.yaml differs from the schema's defaults (value, default): {stale}"
    assert set(sync_schema.CHART_SHAPE) <= set(differences), \
        f"CHART_SHAPE names keys that equal the default: {sorted(set(sync_schema.CHART_SHAPE) - set(differences))}"


def test_differences_report_changed_and_unknown_keys():
    values = {"target": {"dtype": "auto"}, "serve": {"grpc_port": 1, "colour": 2}, "image": {"tag": "x"}}
    assert sync_schema.differences(values) == {"serve.grpc_port": (1, 9000), "serve.colour": (2, "not a schema key")}


def _comment_above(lines: list[str], i: int) -> str:
    j = i
    while j > 0 and lines[j - 1].lstrip().startswith("#"):
        j -= 1
    return "\n".join(lines[j:i + 1])


@pytest.mark.parametrize("path", ["helm/specserve/values.yaml", "configs/local.yaml"])
def test_lists_of_drafters_name_every_drafter(path):
    lines = (ROOT / path).read_text().splitlines()
    (i,) = [i for i, line in enumerate(lines) if re.match(r"\s*drafter:", line)]
    text = _comment_above(lines, i)
    missing = [n for n in DRAFTER_NAMES if not re.search(rf"\b{n}\b", text)]
    assert not missing, f"{path}: the drafter's comment lacks {missing}"


# -- CLI help ----------------------------------------------------------------------------------------
def _actions():
    from specserve.cluster.cli import build_parser

    parser = build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    for name, command in sub.choices.items():
        formatter = command._get_formatter()
        for action in command._actions:
            if action.help and action.help is not argparse.SUPPRESS:
                yield name, action, formatter._expand_help(action)


def test_cli_help_states_the_real_defaults():
    leaves, wrong, checked = config_docs.leaves(), [], 0
    for command, action, text in _actions():
        for stated in re.findall(r"\(default:? ([^\s)]+)\)", text):
            checked += 1
            if stated != str(action.default):
                wrong.append(f"{command} {action.option_strings}: says {stated}, is {action.default}")
        for key, stated in re.findall(r"the config's ([\w.]+) \(([^\s)]+)", text):
            checked += 1
            if stated != str(leaves[key]):
                wrong.append(f"{command} {action.option_strings}: says {key} {stated}, schema {leaves[key]}")
    assert not wrong
    assert checked >= 3


def test_cli_app_defaults_are_the_schema_app_name():
    apps = [a.default for _, a, _ in _actions() if "--app" in a.option_strings]
    assert apps and set(apps) == {DEFAULTS.serve.app_name}
