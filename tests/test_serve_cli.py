"""`specserve serve` as users run it (a subprocess with its own local Ray), and `specserve generate
--address` as its gRPC client: greedy output with speculation equals plain decoding, a bad field
is exit 2 naming it, the API token is required where set, and Ctrl-C shuts everything down cleanly."""

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from conftest import free_port

ROOT = Path(__file__).resolve().parent.parent
SPECSERVE = [sys.executable, "-m", "cluster.cli"]
TOKEN = "test-token-7c1e"  # the server's SPECSERVE_API_TOKEN (a Secret, in a cluster)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    config = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())
    config["cluster"]["draft_replicas"] = 1
    path = tmp_path_factory.mktemp("serve") / "tiny-serve.yaml"
    path.write_text(yaml.safe_dump(config))
    grpc_port, http_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "SPECSERVE_API_TOKEN")}
    env["SPECSERVE_API_TOKEN"] = TOKEN
    proc = subprocess.Popen(
        SPECSERVE + ["serve", "--config", str(path), "--grpc-port", str(grpc_port), "--http-port", str(http_port)],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )
    lines = []
    deadline = time.time() + 180
    while time.time() < deadline:
        line = proc.stdout.readline()
        if not line and proc.poll() is not None:
            pytest.fail(f"specserve serve exited with {proc.returncode}: {''.join(lines)}")
        lines.append(line)
        if "Ctrl-C" in line:
            break
    else:
        proc.kill()
        pytest.fail("specserve serve did not come up in 180 s")
    yield proc, f"127.0.0.1:{grpc_port}", "".join(lines), http_port
    if proc.poll() is None:
        proc.kill()


def _generate(address, *args, token=TOKEN):
    env = {k: v for k, v in os.environ.items() if k != "SPECSERVE_API_TOKEN"}
    auth = ["--token", token] if token else []
    out = subprocess.run(SPECSERVE + ["generate", "--address", address, "--prompt", "hello world, this is a test",
                                      "--max-new-tokens", "16", *auth, *args], cwd=ROOT, capture_output=True, text=True,
                         timeout=120, env=env)
    return out.returncode, out.stdout, out.stderr


def test_serve_prints_its_endpoints(server):
    _, address, banner, _ = server
    assert f"gRPC  localhost:{address.split(':')[1]}" in banner and "/v1/completions" in banner
    assert "API token is required" in banner


def test_generate_against_the_service(server):
    _, address, _, _ = server
    rc, out, err = _generate(address, "--json", "--num-draft-tokens", "3")
    assert rc == 0, err
    spec = json.loads(out)
    rc, out, err = _generate(address, "--json", "--num-draft-tokens", "0")
    plain = json.loads(out)
    assert spec["token_ids"] == plain["token_ids"] and spec["text"] == plain["text"]
    assert spec["stats"]["accepted_tokens"] > 0 and plain["stats"]["draft_tokens"] == 0
    rc, out, err = _generate(address, "--json", "--stream", "--num-draft-tokens", "3")
    assert rc == 0 and json.loads(out)["token_ids"] == spec["token_ids"]
    assert json.loads(out)["text"] == spec["text"]


def test_bad_field_is_exit_2_naming_it(server):
    _, address, _, _ = server
    rc, _, err = _generate(address, "--temperature", "-1")
    assert rc == 2 and "invalid temperature" in err


def _http(port, path, token=None, body=None):
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=body and json.dumps(body).encode(),
                                     headers={"authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_api_token_is_required_over_grpc_and_http(server):
    _, address, _, http_port = server
    for token in (None, "wrong-token"):
        rc, _, err = _generate(address, token=token)
        assert rc == 1 and "UNAUTHENTICATED" in err and "Bearer" in err
        status, body = _http(http_port, "/v1/completions", token, {"prompt": "hello", "max_tokens": 4})
        assert status == 401 and body["error"]["param"] == "authorization"
    status, _ = _http(http_port, "/v1/models")
    assert status == 401
    status, body = _http(http_port, "/v1/completions", TOKEN, {"prompt": "hello", "max_tokens": 4, "temperature": 0})
    assert status == 200 and 1 <= body["usage"]["completion_tokens"] <= 4
    status, _ = _http(http_port, "/healthz")  # probes need no token
    assert status == 200


def test_ctrl_c_shuts_down_cleanly(server):
    proc, address, _, _ = server
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=90) == 0
    rc, _, err = _generate(address, "--timeout", "5")
    assert rc == 1 and "UNAVAILABLE" in err
