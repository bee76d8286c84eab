"""The Helm chart, rendered offline with Helm's own library (helm-python-sdk): lint, every rendered
RayService against KubeRay's CRD schema, serveConfigV2 against Ray Serve's schema and the project's
config schema, values.schema.json, and what matters in the manifests (GPUs per target pod, ports,
non-root pods, secrets only referenced, the dashboard kept inside the cluster)."""

from __future__ import annotations

import copy
import importlib
import importlib.util
import json
import re
import time
from pathlib import Path

import helm_python
import jsonschema
import pytest
import yaml

from specserve.cluster import app
from specserve.cluster.config import load_config, parse_config
from conftest import free_port

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "helm" / "specserve"
CRD = Path(__file__).parent / "data" / "kuberay" / "ray.io_rayservices.yaml"
SHARED_CRD = ROOT.parent / "shared" / "kuberay" / "ray.io_rayservices.yaml"
# loaded from its file: helm/ on sys.path would make the chart folder helm/specserve shadow the
# `specserve` package as a namespace package
_spec = importlib.util.spec_from_file_location("sync_schema", ROOT / "helm" / "sync_schema.py")
sync_schema = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sync_schema)


def _yaml(path):
    return yaml.safe_load(Path(path).read_text())


def _merged(*parts: dict) -> dict:
    out: dict = {}
    for part in parts:
        out = _deep_merge(out, part)
    return out


def _deep_merge(a: dict, b: dict) -> dict:
    out = copy.deepcopy(a)
    for k, v in b.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


CI_VALUES = _yaml(CHART / "ci" / "ci-values.yaml")
TLS = {"ingress": {"enabled": True, "tls": {"secretName": "specserve-tls"}},
       "tls": {"http": {"secretName": "specserve-http-tls"}, "draft": {"secretName": "specserve-draft-tls"}},
       "auth": {"apiToken": {"secretName": "specserve-api-token"}, "rayToken": {"secretName": "specserve-ray-token"}}}
VARIANTS = {
    "defaults": {},
    "ci": CI_VALUES,
    "tp1": {"cluster": {"tp_size": 1}},
    "tp4": {"cluster": {"tp_size": 4}},
    "tp8": {"cluster": {"tp_size": 8}},
    "autoscaling-off": {"autoscaling": {"enabled": False}},
    "tls-on": TLS,
    "ingress-on": {"ingress": {"enabled": True}},
    "no-draft-replicas": {"cluster": {"draft_replicas": 0}, "draft": {"drafter": "ngram"}},
    "gpu-drafts": {"cluster": {"draft_replica": {"gpus": 1}}, "draftWorkers": {"replicasPerPod": 2}},
    "podmonitor": {"monitoring": {"podMonitor": {"enabled": True, "labels": {"release": "prometheus"}}}},
    "gpu-70b-tp8": _merged(_yaml(ROOT / "configs" / "gpu-70b-tp8.yaml"), _yaml(CHART / "examples" / "gpu-70b-tp8.yaml")),
    "gpu-8x-single-node": _merged(_yaml(ROOT / "configs" / "gpu-8x-single-node.yaml"),
                                  _yaml(CHART / "examples" / "gpu-8x-single-node.yaml")),
    "local-config": _yaml(ROOT / "configs" / "local.yaml"),
}


@pytest.fixture(scope="module")
def chart():
    c = helm_python.Chart.load(CHART)
    yield c
    c.close()


def _closed(schema):
    """Kubernetes rejects unknown fields (kubectl's strict field validation): close every object
    that lists its properties and does not preserve unknown fields."""
    if isinstance(schema, dict):
        out = {k: _closed(v) for k, v in schema.items()}
        if "properties" in schema and "additionalProperties" not in schema \
                and not schema.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [_closed(v) for v in schema]
    return schema


@pytest.fixture(scope="module")
def crd_validator():
    crd = _yaml(CRD)
    (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    schema = _closed(v1["schema"]["openAPIV3Schema"])
    return jsonschema.Draft7Validator(schema)


class Rendered:
    def __init__(self, manifests: dict[str, str], values: dict, chart_values: dict):
        manifests = {path: text for path, text in manifests.items() if path.endswith(".yaml")}
        self.docs = [d for text in manifests.values() for d in yaml.safe_load_all(text) if d]
        self.text = "\n".join(manifests.values())
        self.values = _deep_merge(chart_values, values)

    def one(self, kind):
        (doc,) = [d for d in self.docs if d["kind"] == kind]
        return doc

    def kinds(self):
        return sorted(d["kind"] for d in self.docs)

    @property
    def rayservice(self):
        return self.one("RayService")

    @property
    def serve_config(self):
        return yaml.safe_load(self.rayservice["spec"]["serveConfigV2"])

    @property
    def cluster(self):
        return self.rayservice["spec"]["rayClusterConfig"]

    def group(self, name):
        found = [g for g in self.cluster["workerGroupSpecs"] if g["groupName"] == name]
        return found[0] if found else None

    def pods(self):
        yield self.cluster["headGroupSpec"]["template"]
        for g in self.cluster["workerGroupSpecs"]:
            yield g["template"]


def render(chart, values) -> Rendered:
    return Rendered(chart.render(values, name="demo", namespace="serving"), values, chart.values)


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def rendered(request, chart):
    return render(chart, VARIANTS[request.param])


# -- Helm's own checks ------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_lint_is_clean(variant):
    report = helm_python.lint(CHART, VARIANTS[variant], strict=True, kube_version="v1.30.0")
    problems = [m for m in report["messages"] if m["severity"] >= 2] + report["errors"]
    assert not problems, problems


def test_lint_reports_a_broken_template(tmp_path):
    """The negative control: lint is not blind to errors."""
    import shutil

    broken = tmp_path / "specserve"
    shutil.copytree(CHART, broken)
    (broken / "templates" / "broken.yaml").write_text("{{ .Values.nope.missing }}\n")
    report = helm_python.lint(broken, strict=True)
    assert report["errors"] or any(m["severity"] >= 3 for m in report["messages"])


def test_renders_what_each_option_asks_for(chart):
    assert render(chart, {}).kinds() == ["RayService", "Service"]
    assert render(chart, {"ingress": {"enabled": True}}).kinds() == ["Ingress", "RayService", "Service"]
    assert "PodMonitor" in render(chart, VARIANTS["podmonitor"]).kinds()


# -- the RayService against KubeRay's CRD -----------------------------------------------------------
def test_rayservice_validates_against_the_kuberay_crd(rendered, crd_validator):
    errors = sorted(crd_validator.iter_errors(rendered.rayservice), key=str)
    assert not errors, [f"{'/'.join(map(str, e.path))}: {e.message}" for e in errors]


def test_crd_validation_rejects_broken_rayservices(chart, crd_validator):
    """Negative controls: a misspelt field, a group without a pod template, a wrong type."""
    good = render(chart, {}).rayservice
    typo = copy.deepcopy(good)
    typo["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["minReplica"] = 1
    no_template = copy.deepcopy(good)
    del no_template["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"]
    wrong_type = copy.deepcopy(good)
    wrong_type["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["maxReplicas"] = "two"
    for bad in (typo, no_template, wrong_type):
        assert not crd_validator.is_valid(bad)


def test_vendored_crd_is_the_shared_one():
    if not SHARED_CRD.is_file():
        pytest.skip("no ../shared/kuberay beside this checkout")
    assert CRD.read_bytes() == SHARED_CRD.read_bytes()


# -- serveConfigV2 -------------------------------------------------------------------------------------
def test_serve_config_is_valid_for_ray_serve_and_the_project(rendered):
    from ray.serve.schema import ServeDeploySchema

    serve_config = ServeDeploySchema.model_validate(rendered.serve_config)
    (application,) = serve_config.applications
    module, attr = application.import_path.split(":")
    assert getattr(importlib.import_module(module), attr) is app.build_app
    config = app.config_from_args(application.args)  # what build_app does with its args
    v = rendered.values
    for section in ("target", "draft", "speculation", "serve"):
        expected = parse_config({section: v[section]})
        if section == "serve":  # less the TLS files the chart mounts (test_tls_secrets_...)
            assert config.serve.model_copy(update={"tls": None}) == expected.serve
            continue
        assert getattr(config, section) == getattr(expected, section)
    assert config.cluster.tp_size == v["cluster"]["tp_size"]
    assert config.cluster.target_rank.resources["specserve_target"] == 1
    assert config.cluster.draft_replica.resources["specserve_draft"] == 1
    assert application.name == config.serve.app_name and application.route_prefix == "/"


@pytest.mark.ray
def test_rendered_serve_config_deploys_and_serves(chart, ray_cluster):
    """The chart's serveConfigV2 deployed as KubeRay deploys it (Serve's config API) on a real local
    Ray: build_app from its args, the custom resources, the gRPC servicer and port all work, and
    greedy output with speculation equals plain decoding."""
    from ray import serve
    from ray.serve._private import api as serve_api
    from ray.serve.config import gRPCOptions
    from ray.serve.schema import ServeDeploySchema

    from specserve.cluster.client import Client, proto_request

    small = {"cpus": 0.25, "gpus": 0, "threads": 1}  # the CI shape, scaled to this machine's 2 CPUs
    values = _deep_merge(CI_VALUES, {
        "cluster": {"target_rank": small, "draft_replica": small, "coordinator": small},
        "serve": {"app_name": "helm-rendered", "grpc_port": free_port(), "http_port": free_port(), "host": "127.0.0.1"},
    })
    config = ServeDeploySchema.model_validate(render(chart, values).serve_config)
    client = serve_api.serve_start(http_options=config.http_options.model_dump(),
                                   grpc_options=gRPCOptions(**config.grpc_options.model_dump()))
    try:
        client.deploy_apps(config, _blocking=False)
        deadline = time.time() + 240
        while (status := serve.status().applications.get("helm-rendered")) is None or status.status != "RUNNING":
            assert status is None or status.status not in ("DEPLOY_FAILED", "UNHEALTHY"), status.message
            assert time.time() < deadline, "the rendered app did not start in 240 s"
            time.sleep(1)
        api = Client(f"127.0.0.1:{values['serve']['grpc_port']}", "helm-rendered", timeout_s=120)
        spec = api.generate(proto_request("hello world, this is a test", 16, num_draft_tokens=3))
        plain = api.generate(proto_request("hello world, this is a test", 16, num_draft_tokens=0))
        assert list(spec.token_ids) == list(plain.token_ids) and spec.stats.accepted_tokens > 0
        health = api.health()
        assert (health.tp_size, health.draft_replicas) == (2, 1)
        api.close()
    finally:
        serve.shutdown()


def test_a_bad_config_in_values_is_rejected_by_the_project_schema(chart):
    """The JSON schema cannot say min <= max; the args still meet the project's own checks."""
    bad = render(chart, {"serve": {"drafts": {"min_replicas": 3, "max_replicas": 2}}})
    with pytest.raises(ValueError, match="min_replicas .* exceeds max_replicas"):
        parse_config(bad.serve_config["applications"][0]["args"])


def test_grpc_port_matches_the_app(rendered):
    config = parse_config(rendered.serve_config["applications"][0]["args"])
    grpc_options = rendered.serve_config["grpc_options"]
    assert grpc_options["grpc_servicer_functions"] == [app.GRPC_SERVICER]
    assert grpc_options["port"] == config.serve.grpc_port == rendered.values["serve"]["grpc_port"]
    assert rendered.serve_config["http_options"]["port"] == config.serve.http_port
    for pod in rendered.pods():
        ports = {p["name"]: p["containerPort"] for p in pod["spec"]["containers"][0]["ports"]}
        assert ports["grpc"] == config.serve.grpc_port and ports["serve"] == config.serve.http_port
    service = rendered.one("Service")
    by_name = {p["name"]: p for p in service["spec"]["ports"]}
    assert by_name["grpc"]["port"] == config.serve.grpc_port and by_name["grpc"]["targetPort"] == "grpc"
    assert service["spec"]["selector"]["ray.io/serve"] == "true"


def test_custom_grpc_port_flows_everywhere(chart):
    r = render(chart, {"serve": {"grpc_port": 50051}, "ingress": {"enabled": True}})
    assert r.serve_config["grpc_options"]["port"] == 50051
    assert {p["name"]: p["port"] for p in r.one("Service")["spec"]["ports"]}["grpc"] == 50051
    backend = r.one("Ingress")["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    assert backend == {"name": "demo-specserve", "port": {"name": "grpc"}}


# -- sizes -------------------------------------------------------------------------------------------
def _gpus(container, name="nvidia.com/gpu"):
    limits = container["resources"].get("limits", {})
    return int(limits.get(name, 0))


def test_gpus_per_target_pod_equal_tp_size(rendered):
    c = rendered.values["cluster"]
    target = rendered.group("target")
    want = c["tp_size"] * c["target_rank"]["gpus"] + c["coordinator"]["gpus"]
    container = target["template"]["spec"]["containers"][0]
    assert _gpus(container) == want == int(target["resources"]["GPU"])
    if c["target_rank"]["gpus"] == 1 and c["coordinator"]["gpus"] == 0:
        assert _gpus(container) == c["tp_size"]
    if want:
        assert container["resources"]["requests"]["nvidia.com/gpu"] == want
    assert int(target["resources"]["specserve_target"]) == c["tp_size"]
    assert int(target["resources"]["CPU"]) >= c["tp_size"] * c["target_rank"]["cpus"] + c["coordinator"]["cpus"]


@pytest.mark.parametrize("tp", [1, 4, 8])
def test_tp_size_sizes_the_target_pod(chart, tp):
    r = render(chart, {"cluster": {"tp_size": tp}})
    assert _gpus(r.group("target")["template"]["spec"]["containers"][0]) == tp
    assert parse_config(r.serve_config["applications"][0]["args"]).cluster.tp_size == tp


def _cpu(q) -> float:
    q = str(q)
    return float(q[:-1]) / 1000 if q.endswith("m") else float(q)


def test_a_cpu_request_below_the_ray_cpus_is_refused(chart):
    with pytest.raises(helm_python.HelmRenderError,
                       match=r"targetWorkers.resources.requests.cpu \(500m\) is less than the 9 Ray CPUs of one pod"):
        chart.render({"cluster": {"tp_size": 4}, "targetWorkers": {"resources": {"requests": {"cpu": "500m"}}}})


def test_pods_request_the_ray_resources_they_advertise(rendered):
    for name in ("target", "drafts"):
        group = rendered.group(name)
        if group is None:
            continue
        container = group["template"]["spec"]["containers"][0]
        assert _cpu(container["resources"]["requests"]["cpu"]) >= float(group["resources"]["CPU"]), name
        # KubeRay refuses resources given both here and in rayStartParams
        assert not {"num-cpus", "num-gpus", "memory", "resources"} & set(group["rayStartParams"])


def test_draft_group_holds_the_draft_replicas(rendered):
    v, drafts = rendered.values, rendered.group("drafts")
    if v["cluster"]["draft_replicas"] == 0:
        assert drafts is None
        return
    per_pod = v["draftWorkers"]["replicasPerPod"]
    d = v["serve"]["drafts"]
    assert drafts["maxReplicas"] == -(-d["max_replicas"] // per_pod)
    assert int(drafts["resources"]["specserve_draft"]) == per_pod
    gpus = _gpus(drafts["template"]["spec"]["containers"][0])
    assert gpus == -(-per_pod * v["cluster"]["draft_replica"]["gpus"] // 1)


def test_autoscaling_ranges_follow_the_serve_config(chart):
    on = render(chart, {"serve": {"engines": {"min_replicas": 2, "max_replicas": 5}}})
    assert on.cluster["enableInTreeAutoscaling"] is True
    target = on.group("target")
    assert (target["minReplicas"], target["maxReplicas"], target["replicas"]) == (2, 5, 2)
    assert on.cluster["autoscalerOptions"]["idleTimeoutSeconds"] == 300
    off = render(chart, {"autoscaling": {"enabled": False}, "serve": {"engines": {"min_replicas": 2, "max_replicas": 5}}})
    assert off.cluster["enableInTreeAutoscaling"] is False and "autoscalerOptions" not in off.cluster
    target = off.group("target")
    assert (target["minReplicas"], target["maxReplicas"], target["replicas"]) == (5, 5, 5)


# -- security -------------------------------------------------------------------------------------------
def test_pods_run_as_non_root(rendered):
    for pod in rendered.pods():
        spec = pod["spec"]
        assert spec["securityContext"]["runAsNonRoot"] is True and spec["securityContext"]["runAsUser"] > 0
        for container in spec["containers"]:
            sc = container["securityContext"]
            assert sc["runAsNonRoot"] is True and sc["allowPrivilegeEscalation"] is False
            assert sc["capabilities"]["drop"] == ["ALL"]
    if rendered.cluster["enableInTreeAutoscaling"]:
        assert rendered.cluster["autoscalerOptions"]["securityContext"]["runAsNonRoot"] is True


def test_secrets_are_referenced_never_inlined(chart):
    values = _deep_merge(TLS, {"env": [{"name": "SPECSERVE_NOTE", "value": "plain"}]})
    r = render(chart, values)
    assert "Secret" not in r.kinds() and "stringData" not in r.text
    for pod in r.pods():
        env = {e["name"]: e for e in pod["spec"]["containers"][0]["env"]}
        assert env["SPECSERVE_API_TOKEN"] == {"name": "SPECSERVE_API_TOKEN", "valueFrom": {
            "secretKeyRef": {"name": "specserve-api-token", "key": "token"}}}
    assert r.cluster["authOptions"] == {"mode": "token", "secretName": "specserve-ray-token"}
    assert r.one("Ingress")["spec"]["tls"] == [{"hosts": ["specserve.example.com"], "secretName": "specserve-tls"}]
    assert not re.search(r"\btoken\b|secret", r.rayservice["spec"]["serveConfigV2"], re.I)
    # and no token at all unless one is referenced
    plain = render(chart, {})
    assert all("SPECSERVE_API_TOKEN" not in json.dumps(p) for p in plain.pods()) and "authOptions" not in plain.cluster


def test_tls_secrets_are_mounted_on_every_pod_and_configure_the_service(chart):
    """tls.http.secretName / tls.draft.secretName: each Secret is mounted read-only on every Ray pod and
    the app's config points serve.tls and cluster.draft_tls at the mounted files; without them,
    neither appears."""
    from specserve.cluster.config import parse_config

    r = render(chart, TLS)
    for pod in r.pods():
        volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
        assert volumes["http-tls"]["secret"]["secretName"] == "specserve-http-tls"
        assert volumes["draft-tls"]["secret"]["secretName"] == "specserve-draft-tls"
        mounts = {m["name"]: m for m in pod["spec"]["containers"][0]["volumeMounts"]}
        assert mounts["http-tls"] == {"name": "http-tls", "mountPath": "/etc/specserve/http-tls", "readOnly": True}
        assert mounts["draft-tls"] == {"name": "draft-tls", "mountPath": "/etc/specserve/draft-tls", "readOnly": True}
    (app,) = r.serve_config["applications"]
    config = parse_config(app["args"])
    assert config.serve.tls.cert_file == "/etc/specserve/http-tls/tls.crt"
    assert config.cluster.draft_tls.ca_file == "/etc/specserve/draft-tls/ca.crt"
    assert config.cluster.draft_tls.server_name == "specserve-draft"
    plain = render(chart, {})
    (app,) = plain.serve_config["applications"]
    assert parse_config(app["args"]).serve.tls is None and parse_config(app["args"]).cluster.draft_tls is None
    assert all("tls" not in json.dumps(p["spec"]["volumes"]) for p in plain.pods())


def test_the_values_file_holds_no_secret_values(chart):
    """The chart has no key that takes a secret's value: only Secret names (and the schema refuses one)."""
    def keys(node, prefix=""):
        if isinstance(node, dict):
            for k, v in node.items():
                yield from keys(v, f"{prefix}.{k}" if prefix else k)
        else:
            yield prefix, node

    for key, value in keys(_yaml(CHART / "values.yaml")):
        sensitive = [seg for seg in key.split(".") if re.fullmatch(r".*Token|token|.*[Pp]assword.*|tls|.*[Ss]ecret.*", seg)]
        if sensitive and key != "imagePullSecrets":
            assert key.endswith((".secretName", ".key")), key
    for inlined in ({"auth": {"apiToken": {"value": "abc"}}}, {"ingress": {"tls": {"key": "-----BEGIN"}}}):
        with pytest.raises(helm_python.HelmValuesError, match="additional properties"):
            chart.validate_schema(inlined)


def test_dashboard_is_not_exposed_outside_the_cluster(rendered):
    head = rendered.cluster["headGroupSpec"]
    assert head["serviceType"] == "ClusterIP" and not head.get("enableIngress", False)
    service = rendered.one("Service")
    assert 8265 not in [p["port"] for p in service["spec"]["ports"]]
    if "Ingress" in rendered.kinds():
        for rule in rendered.one("Ingress")["spec"]["rules"]:
            for path in rule["http"]["paths"]:
                assert path["backend"]["service"]["port"] == {"name": "grpc"}


# -- values.schema.json ----------------------------------------------------------------------------------
@pytest.mark.parametrize("bad, where", [
    ({"serve": {"engines": {"min_replicas": -1}}}, "/serve/engines/min_replicas"),
    ({"serve": {"drafts": {"max_replicas": -2}}}, "/serve/drafts/max_replicas"),
    ({"draftWorkers": {"replicasPerPod": -1}}, "/draftWorkers/replicasPerPod"),
    ({"cluster": {"tp_size": 0}}, "/cluster/tp_size"),
    ({"bogus": 1}, "additional properties 'bogus'"),
    ({"cluster": {"tp_sizes": 2}}, "additional properties 'tp_sizes'"),
    ({"ingress": {"tls": {"crt": "x"}}}, "additional properties 'crt'"),
    ({"speculation": {"num_draft_tokens": "many"}}, "/speculation/num_draft_tokens"),
    ({"podSecurityContext": {"runAsNonRoot": False}}, "/podSecurityContext/runAsNonRoot"),
    ({"securityContext": {"allowPrivilegeEscalation": True}}, "/securityContext/allowPrivilegeEscalation"),
    ({"service": {"type": "External"}}, "/service/type"),
])
def test_values_schema_rejects_bad_values(chart, bad, where):
    with pytest.raises(helm_python.HelmValuesError, match=re.escape(where)):
        chart.validate_schema(bad)
    with pytest.raises(helm_python.HelmValuesError):  # helm install / template refuse them too
        chart.render(bad, name="demo")


def test_values_schema_accepts_every_shipped_values_file(chart):
    for values in VARIANTS.values():
        chart.validate_schema(values)


def test_values_schema_config_part_is_the_project_schema():
    on_disk = json.loads(sync_schema.SCHEMA.read_text())
    assert sync_schema.render(sync_schema.synced(on_disk)) == sync_schema.SCHEMA.read_text(), \
        "values.schema.json is stale: run .venv/bin/python helm/sync_schema.py"


def test_every_value_is_documented():
    """helm-docs style: a '# --' comment block right above every key (keys inside list items aside)."""
    lines = (CHART / "values.yaml").read_text().splitlines()
    documented = 0
    for i, line in enumerate(lines):
        m = re.match(r"^(\s*)([A-Za-z_][\w./-]*):", line)
        if not m:
            continue
        parent = next((p for p in reversed(lines[:i]) if p.strip() and not p.lstrip().startswith("#")
                       and len(p) - len(p.lstrip()) < len(m.group(1))), "")
        if parent.lstrip().startswith("- "):
            continue  # a key inside a list item
        j = i - 1
        while j >= 0 and lines[j].lstrip().startswith("#") and not lines[j].lstrip().startswith("# --"):
            j -= 1  # a comment block continues upwards to its '# --' line
        assert j >= 0 and lines[j].lstrip().startswith("# --"), f"values.yaml:{i + 1}: {m.group(2)} has no '# --' comment"
        documented += 1
    assert documented > 80


# -- shipped configs, image and versions ---------------------------------------------------------------
@pytest.mark.parametrize("name", ["gpu-70b-tp8.yaml", "gpu-8x-single-node.yaml"])
def test_gpu_configs_validate(name):
    config = load_config(ROOT / "configs" / name)
    assert config.target.device == "cuda" and config.cluster.target_rank.gpus == 1
    assert config.cluster.tp_size in (4, 8) and config.draft.drafter == "model"


def test_chart_versions_match_the_project():
    import ray

    chart = _yaml(CHART / "Chart.yaml")
    project = (ROOT / "pyproject.toml").read_text()
    assert f'version = "{chart["appVersion"]}"' in project
    assert chart["annotations"]["specserve.io/ray-version"] == ray.__version__
    assert f'"ray[serve]=={ray.__version__}"' in project


def test_default_image_is_the_dockerfile_build(chart):
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^FROM nvidia/cuda:\S+", dockerfile, re.M) or "ARG BASE_IMAGE=nvidia/cuda:" in dockerfile
    users = re.findall(r"^USER (\S+)", dockerfile, re.M)
    assert users and users[-1] not in ("root", "0", "0:0")
    uid = int(users[-1].split(":")[0])
    assert uid == chart.values["podSecurityContext"]["runAsUser"]
    image = f"{chart.values['image']['repository']}:{_yaml(CHART / 'Chart.yaml')['appVersion']}"
    assert render(chart, {}).cluster["headGroupSpec"]["template"]["spec"]["containers"][0]["image"] == image
    assert f"docker build -t {image} ." in (ROOT / "docs" / "kubernetes.md").read_text()
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert ".venv" in ignored and ".git" in ignored
