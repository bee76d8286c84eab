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

from conftest import free_port, make_certs

ROOT = Path(__file__).resolve().parent.parent
SPECSERVE = [sys.executable, "-m", "specserve.cluster.cli"]
TOKEN = "test-token-7c1e"  # the server's SPECSERVE_API_TOKEN (a Secret, in a cluster)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    config = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())
    config["cluster"]["draft_replicas"] = 1
    folder = tmp_path_factory.mktemp("serve")
    certs = make_certs(folder)
    config["serve"] = {"tls": {"cert_file": certs["cert_file"], "key_file": certs["key_file"]}}  # HTTPS
    path = folder / "tiny-serve.yaml"
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
    yield proc, f"127.0.0.1:{grpc_port}", "".join(lines), (http_port, certs["ca_file"])
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
    assert f"gRPC  localhost:{address.split(':')[1]}" in banner and "/v1/chat/completions" in banner
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


def _http(https, path, token=None, body=None):
    """A request to the service's HTTPS endpoint, trusting the test CA."""
    import ssl

    port, ca_file = https
    request = urllib.request.Request(f"https://127.0.0.1:{port}{path}", data=body and json.dumps(body).encode(),
                                     headers={"authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=60, context=ssl.create_default_context(cafile=ca_file)) as r:
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


def test_soak_command_reports_outcomes_and_latencies(server, tmp_path):
    _, address, _, _ = server
    out = tmp_path / "soak.json"
    env = {k: v for k, v in os.environ.items() if k != "SPECSERVE_API_TOKEN"}
    run = subprocess.run(SPECSERVE + ["soak", "--address", address, "--token", TOKEN, "--streams", "4", "--seconds", "3",
                                      "--max-new-tokens", "8", "--json", str(out)],
                         cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)
    assert run.returncode == 0, run.stderr
    report = json.loads(out.read_text())
    assert report == json.loads(run.stdout)
    assert report["requests"] == sum(report["outcomes"].values()) >= 4 and report["outcomes"].get("OK", 0) >= 1
    assert set(report["outcomes"]) <= {"OK", "CANCELLED", "DEADLINE_EXCEEDED"}
    assert report["latency_p99_s"] >= report["latency_p50_s"] > 0
    bad = subprocess.run(SPECSERVE + ["soak", "--address", address, "--streams", "0"], cwd=ROOT, capture_output=True,
                         text=True, timeout=60, env=env)
    assert bad.returncode == 2 and "invalid streams" in bad.stderr


def test_http_is_served_over_tls_only(server):
    """serve.tls: the HTTP API answers HTTPS with the configured certificate; plaintext HTTP and a
    client that does not trust the certificate are refused."""
    import http.client
    import ssl

    _, _, banner, (port, ca_file) = server
    assert f"https://localhost:{port}" in banner
    plain = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    with pytest.raises((http.client.HTTPException, OSError)):
        plain.request("GET", "/healthz")
        plain.getresponse()
    with pytest.raises(urllib.error.URLError, match="CERTIFICATE_VERIFY_FAILED"):
        urllib.request.urlopen(f"https://127.0.0.1:{port}/healthz", timeout=10, context=ssl.create_default_context())
    status, _ = _http((port, ca_file), "/healthz")
    assert status == 200


def test_ctrl_c_shuts_down_cleanly(server):
    proc, address, _, _ = server
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=90) == 0
    rc, _, err = _generate(address, "--timeout", "5")
    assert rc == 1 and "UNAVAILABLE" in err


def _left_behind(mark: str) -> list[str]:
    """Command lines of the processes that carry this run's marker in their environment (Ray's
    processes inherit it from `specserve serve`)."""
    left = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and mark.encode() in (proc / "environ").read_bytes():
                left.append((proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"))
        except OSError:  # gone meanwhile, or not ours
            continue
    return left


def _bindable(port: int) -> bool:
    import socket

    with socket.socket() as s:
        try:
            s.bind(("0.0.0.0", port))
            return True
        except OSError:
            return False


@pytest.mark.parametrize("moment", ["loading", "serving", "shutting down"])
def test_a_signal_at_any_moment_exits_promptly_and_leaves_nothing(tmp_path, moment):
    """SIGTERM or Ctrl-C while models load, while serving, or again while shutting down: exit 0
    within seconds, and no Ray process, listening port or shared-memory file is left."""
    import uuid

    config = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    grpc_port, http_port = free_port(), free_port()
    mark = f"specserve-signal-{uuid.uuid4().hex}"
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "SPECSERVE_API_TOKEN")}
    env["SPECSERVE_TEST_MARK"] = mark
    shm_before = set(os.listdir("/dev/shm"))
    proc = subprocess.Popen(
        SPECSERVE + ["serve", "--config", str(path), "--grpc-port", str(grpc_port), "--http-port", str(http_port)],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        wanted = {"loading": "models load", "serving": "Ctrl-C stops it", "shutting down": "Ctrl-C stops it"}[moment]
        deadline = time.time() + 180
        while time.time() < deadline:
            line = proc.stdout.readline()
            assert line or proc.poll() is None, f"specserve serve exited with {proc.returncode}"
            if wanted in line:
                break
        else:
            pytest.fail(f"specserve serve never printed {wanted!r}")
        proc.send_signal(signal.SIGTERM if moment != "shutting down" else signal.SIGINT)
        if moment == "shutting down":
            while (line := proc.stdout.readline()) and "shutting down" not in line:
                pass
            proc.send_signal(signal.SIGTERM)  # again, in the middle of the clean-up
        start = time.time()
        assert proc.wait(timeout=60) == 0
        elapsed = time.time() - start
    finally:
        if proc.poll() is None:
            proc.kill()
    assert elapsed < 30
    wait_until_clean = time.time() + 10  # Ray's processes exit as the raylet stops them
    while _left_behind(mark) and time.time() < wait_until_clean:
        time.sleep(0.2)
    assert _left_behind(mark) == []
    assert _bindable(grpc_port) and _bindable(http_port)
    assert set(os.listdir("/dev/shm")) - shm_before == set()
