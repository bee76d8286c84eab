from pathlib import Path

import pytest

from specserve.cluster.config import ConfigError, load_config, parse_config

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


def test_cluster_shape_must_fit_the_ray_cluster():
    from specserve.cluster.launcher import check_resources

    config = load_config(ROOT / "configs" / "tiny.yaml")  # 2 x 0.5 + 2 x 0.25 + 0.25 CPUs
    assert config.cluster.required() == {"CPU": 1.75, "GPU": 0.0}
    check_resources(config, {"CPU": 2.0})
    with pytest.raises(ConfigError, match=r"needs 1.75 CPU \(tp_size x target_rank.cpus"):
        check_resources(config, {"CPU": 1.0})
    gpu = parse_config({"cluster": {"tp_size": 2, "target_rank": {"gpus": 1}}})
    with pytest.raises(ConfigError, match="needs 2 GPU"):
        check_resources(gpu, {"CPU": 8.0})


def test_bench_distributed_rejects_plot_before_starting_anything(capsys):
    from specserve.cluster.cli import main

    assert main(["bench", "--distributed", "--plot", "x.png"]) == 2
    assert "invalid plot" in capsys.readouterr().err
    assert main(["bench", "--distributed", "--concurrency", "0"]) == 2
    assert "invalid concurrency" in capsys.readouterr().err


def test_custom_ray_resources_pin_actors_to_nodes():
    r = parse_config({"cluster": {"target_rank": {"cpus": 4, "gpus": 1, "resources": {"specserve_target": 1}}}}).cluster.target_rank
    assert r.options() == {"num_cpus": 4, "num_gpus": 1, "resources": {"specserve_target": 1}}
    assert r.bundle() == {"CPU": 4, "GPU": 1, "specserve_target": 1}
    plain = parse_config({}).cluster.draft_replica
    assert plain.options() == {"num_cpus": 0.25, "num_gpus": 0.0} and plain.bundle() == {"CPU": 0.25}
    for bad in ({"GPU": 1}, {"x": -1}):
        with pytest.raises(ConfigError, match="cluster.draft_replica: .*custom Ray resources only"):
            parse_config({"cluster": {"draft_replica": {"resources": bad}}})
