from pathlib import Path

import pytest

from cluster.config import ConfigError, load_config, parse_config

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_validate(path):
    load_config(path)


def test_embedded_default_is_configs_local_yaml():
    assert load_config(None) == load_config(ROOT / "configs" / "local.yaml")


@pytest.mark.parametrize(
    "data,where",
    [
        ({"target": {"modle": "x"}}, "target.modle: unknown key"),
        ({"speculaton": {}}, "speculaton: unknown key"),
        ({"draft": {"ngram": {"max": 3}}}, "draft.ngram.max: unknown key"),
        ({"draft": {"drafter": "medusa"}}, "draft.drafter"),
        ({"target": {"dtype": "float16"}}, "target.dtype"),
        ({"draft": {"drafter": "model"}}, "draft.model.name"),
        ({"speculation": {"num_draft_tokens": 9, "max_draft_tokens": 8}}, "speculation.num_draft_tokens"),
        ({"speculation": {"max_draft_tokens": 0}}, "speculation.max_draft_tokens"),
        ({"draft": {"ngram": {"max_n": 1, "min_n": 2}}}, "min_n"),
    ],
)
def test_bad_config_names_the_key(data, where):
    with pytest.raises(ConfigError, match=where.replace(".", r"\.")):
        parse_config(data, "test.yaml")


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "list.yaml"
    bad.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(bad)
