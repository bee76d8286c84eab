"""Refusals at the trust boundaries: mutual TLS on the internal draft channel (no client
certificate, or one from another CA: refused), draft replicas on the node's cluster address only,
draft sequences of one engine invisible to another and freed when idle, and nothing from the
network deserialised with pickle. (HTTPS on the public HTTP endpoint: tests/test_serve_cli.py.)"""

import ast
import socket
from pathlib import Path

import grpc
import pytest
from specserve.internal.v1 import draft_pb2 as pb
from specserve.internal.v1 import draft_pb2_grpc as pb_grpc

from specserve.actors.draft_service import DraftServicer, create_server
from specserve.actors.remote_drafter import RemoteDrafter
from specserve.cluster.config import ConfigError, DraftTls
from specserve.cluster.runtime.drafters import NgramDrafter
from specserve.cluster.speculation import SamplingParams
from conftest import make_certs

ROOT = Path(__file__).resolve().parent.parent
GREEDY = SamplingParams(temperature=0.0)
CONTEXT = list(b"abcabcabcabcab")


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return make_certs(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="module")
def tls_server(certs):
    tls = DraftTls(ca_file=certs["ca_file"], cert_file=certs["cert_file"], key_file=certs["key_file"])
    server, port = create_server(NgramDrafter(), "127.0.0.1:0", tls=tls)
    server.start()
    yield tls, f"127.0.0.1:{port}"
    server.stop(None)


def _propose(drafter: RemoteDrafter):
    return drafter.propose(1, CONTEXT, 3, GREEDY, 0)


def test_mutual_tls_admits_a_client_the_ca_signed(tls_server):
    tls, address = tls_server
    drafter = RemoteDrafter(address, timeout_s=10, tls=tls)
    assert _propose(drafter).token_ids == list(b"cab")
    drafter.close()


def test_mutual_tls_refuses_plaintext_and_a_certificate_from_another_ca(tls_server, certs):
    _, address = tls_server
    with pytest.raises(grpc.RpcError) as plain:
        _propose(RemoteDrafter(address, timeout_s=5))
    assert plain.value.code() == grpc.StatusCode.UNAVAILABLE
    rogue = DraftTls(ca_file=certs["ca_file"], cert_file=certs["rogue_cert_file"], key_file=certs["rogue_key_file"])
    with pytest.raises(grpc.RpcError) as other_ca:
        _propose(RemoteDrafter(address, timeout_s=5, tls=rogue))
    assert other_ca.value.code() == grpc.StatusCode.UNAVAILABLE


def test_a_missing_certificate_file_is_named(tmp_path):
    from specserve.actors.tls import server_credentials

    tls = DraftTls(ca_file=str(tmp_path / "none.pem"), cert_file="x", key_file="y")
    with pytest.raises(ConfigError, match="cluster.draft_tls.key_file"):
        server_credentials(tls)


def test_sequences_are_per_owner_and_idle_ones_are_freed():
    """Two engines number their sequences alike: one's release must not free the other's, and a
    sequence nobody drafts for idle_s is freed (its engine died); its owner then resends it whole."""
    now = [0.0]
    servicer = DraftServicer(NgramDrafter(), idle_s=5.0, clock=lambda: now[0])
    server, port = create_server(servicer.drafter, "127.0.0.1:0", servicer)
    server.start()
    a, b = (RemoteDrafter(f"127.0.0.1:{port}", timeout_s=10, owner=o) for o in ("engine-a", "engine-b"))
    try:
        assert _propose(a).token_ids == _propose(b).token_ids == list(b"cab")
        assert len(servicer.contexts) == 2
        a.release(1)
        assert list(servicer.contexts) == [("engine-b", 1)]
        now[0] = 6.0
        assert servicer.sweep() == 1 and servicer.contexts == {}
        assert _propose(b).token_ids == list(b"cab")  # FAILED_PRECONDITION, then the whole context again
    finally:
        server.stop(None)


@pytest.mark.ray
def test_a_draft_replica_listens_on_the_node_address_only(ray_cluster):
    import ray

    from specserve.actors.draft_replica import DraftReplica

    config = {"target": {"model": "tiny-llama", "dtype": "float32"}, "draft": {"drafter": "ngram"}}
    replica = DraftReplica.options(num_cpus=0.1).remote(config, None, 1, None)
    try:
        address = ray.get(replica.address.remote())
        host, port = address.rsplit(":", 1)
        assert host == ray.util.get_node_ip_address()
        health = pb_grpc.DraftServiceStub(grpc.insecure_channel(address)).Health(pb.HealthRequest(), timeout=10)
        assert health.drafter == "ngram"
        if host != "127.0.0.1":  # loopback is another interface: nothing listens there
            with pytest.raises(OSError), socket.create_connection(("127.0.0.1", int(port)), timeout=2):
                pass
    finally:
        ray.kill(replica)


def _calls(tree: ast.AST) -> set[str]:
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            name = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")
            owner = getattr(f.value, "id", "") if isinstance(f, ast.Attribute) else ""
            unsafe_torch = owner == "torch" and name == "load" and not any(
                k.arg == "weights_only" and getattr(k.value, "value", None) is True for k in node.keywords)
            if unsafe_torch or (owner in ("pickle", "cloudpickle", "marshal", "dill") and name in ("load", "loads")) \
                    or (owner == "yaml" and name in ("load", "unsafe_load", "full_load")):
                names.add(f"{owner}.{name}")
    return names


def test_nothing_is_unpickled_from_the_network_or_from_files():
    """No module of specserve calls pickle/marshal loads, an unrestricted torch.load or yaml.load:
    the APIs parse protobuf and JSON, tensors travel as raw bytes with a dtype from a fixed list."""
    found = {}
    for path in [*ROOT.glob("cluster/**/*.py"), *ROOT.glob("actors/**/*.py")]:
        calls = _calls(ast.parse(path.read_text()))
        if calls:
            found[str(path.relative_to(ROOT))] = calls
    assert found == {}
    # the checker finds what it looks for (a negative control)
    assert _calls(ast.parse("import pickle, torch\npickle.loads(b'')\ntorch.load('x')")) == {"pickle.loads", "torch.load"}
