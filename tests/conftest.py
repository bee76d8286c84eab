import contextlib

import pytest
import torch

from specserve.cluster.config import parse_config
from specserve.cluster.runtime.factory import load_target, make_engine
from specserve.cluster.runtime.models import load_model
from specserve.cluster.speculation.exact import first_children  # noqa: F401  (the tests import it from here)

TINY_PROMPTS = [
    "hello world, this is a test",
    "abcabcabcabcabcabc",
    "The quick brown fox jumps over the lazy dog. The quick brown fox",
    "x",
    "def f(x):\n    return x + 1\n\ndef g(x):\n    return",
    "1 2 3 4 5 6 7 8 9 10 11 12",
]


def tiny_config(model="tiny-llama", drafter="model", layers=(0, 1, 3), k="adaptive", max_k=8, dtype="float32",
                prefill_chunk=256):
    return parse_config({
        "target": {"model": model, "dtype": dtype, "chat_template": False, "prefill_chunk": prefill_chunk},
        "draft": {"drafter": drafter, "model": {"layers": list(layers)}},
        "speculation": {"num_draft_tokens": k, "max_draft_tokens": max_k},
    })


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: intra-op threads only add contention on a busy 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tiny_llama():
    return load_model("tiny-llama")


@pytest.fixture(scope="session")
def tiny_qwen2():
    return load_model("tiny-qwen2")


@pytest.fixture(scope="session")
def smollm2_fp32():
    return load_target(parse_config({"target": {"model": "smollm2-135m-instruct", "dtype": "float32"}}))


def local_records(tokenizer, n_tokens=40_000) -> list[dict]:
    """Corpus records of local text (the standard library's documents), about n_tokens in all."""
    from specserve.cluster.training.corpus import local_documents

    out, total = [], 0
    for _, text in local_documents()[:400]:
        ids = tokenizer.encode(text)[:1500]
        out.append({"ids": ids})
        total += len(ids)
        if total >= n_tokens:
            break
    return out


def tiny_distributed(draft: dict, draft_replicas: int, speculation: dict):
    """A DistributedEngine of configs/tiny.yaml (tensor parallel 2) with this draft section,
    draft replica count and speculation settings; the caller shuts it down."""
    import yaml

    from specserve.cluster.launcher import DistributedEngine

    data = yaml.safe_load(open("configs/tiny.yaml"))
    data["draft"] = draft
    data["cluster"]["draft_replicas"] = draft_replicas
    data["speculation"] |= speculation
    return DistributedEngine(parse_config(data))


def assert_greedy_equals_plain_on_smollm2(engine, loaded, prompts: list[str], n: int, k) -> list:
    """Greedy requests (chat template, K = k) through `engine` equal plain greedy decoding of the
    loaded SmolLM2, token for token; returns the results for the caller's own checks."""
    from specserve.cluster.runtime.engine import GenerationRequest
    from specserve.cluster.speculation import SamplingParams

    results = engine.generate([GenerationRequest(p, n, SamplingParams(temperature=0.0), k) for p in prompts])
    for p, r in zip(prompts, results):
        ids = loaded.tokenizer.encode_chat(p)
        assert r.token_ids == hf_greedy(loaded.model, ids, n, loaded.tokenizer.eos_token_id)[: len(r.token_ids)]
    return results


def hf_greedy(model, prompt_ids, max_new_tokens, eos_token_id):
    """Plain greedy decoding by transformers' own generate, cut at EOS (EOS excluded)."""
    ids = torch.tensor([prompt_ids])
    with torch.inference_mode():
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
            eos_token_id=eos_token_id, pad_token_id=eos_token_id,
        )
    new = out[0, len(prompt_ids):].tolist()
    return new[: new.index(eos_token_id)] if eos_token_id in new else new


def free_port() -> int:
    """A port free right now for a server under test (specserve.cluster.app.free_port)."""
    from specserve.cluster.app import free_port as find

    return find()


def wait_until(predicate, timeout=60.0, what="", interval=0.2) -> None:
    """Polls until predicate() holds, else AssertionError. A probe that raises (a replica that is
    stopping) counts as not yet. `what` may be a callable, for state read at the time out."""
    import time

    deadline, last = time.time() + timeout, None
    while time.time() < deadline:
        try:
            if predicate():
                return
        except Exception as e:  # noqa: BLE001
            last = e
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {what() if callable(what) else what} (last probe error: {last!r})")


__all__ = ["TINY_PROMPTS", "tiny_config", "hf_greedy", "make_engine", "free_port", "wait_until"]


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray cluster for every integration test (unit tests never start Ray)."""
    import ray

    # plus the Helm chart's custom resources, so an app rendered by the chart deploys here too
    ray.init(num_cpus=2, resources={"specserve_target": 4, "specserve_draft": 4}, include_dashboard=False,
             log_to_driver=False)
    yield ray
    ray.shutdown()


def make_certs(folder, server_name: str = "specserve-draft") -> dict:
    """A test CA, a certificate it signs for server_name (and localhost, 127.0.0.1) with its key,
    and a rogue self-signed certificate: PEM file paths."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def cert(name, key, issuer_name, issuer_key, ca=False):
        b = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
             .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer_name)]))
             .public_key(key.public_key()).serial_number(x509.random_serial_number())
             .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
             .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if not ca:
            b = b.add_extension(x509.SubjectAlternativeName([
                x509.DNSName(server_name), x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                critical=False)
        return b.sign(issuer_key, hashes.SHA256())

    def write(name, data):
        path = folder / name
        path.write_bytes(data)
        return str(path)

    def pem_key(key):
        return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                 serialization.NoEncryption())

    ca_key, key, rogue_key = (ec.generate_private_key(ec.SECP256R1()) for _ in range(3))
    ca = cert("specserve test CA", ca_key, "specserve test CA", ca_key, ca=True)
    leaf = cert(server_name, key, "specserve test CA", ca_key)
    rogue = cert(server_name, rogue_key, server_name, rogue_key)
    pem = serialization.Encoding.PEM
    return {"ca_file": write("ca.pem", ca.public_bytes(pem)), "cert_file": write("cert.pem", leaf.public_bytes(pem)),
            "key_file": write("key.pem", pem_key(key)), "rogue_cert_file": write("rogue.pem", rogue.public_bytes(pem)),
            "rogue_key_file": write("rogue-key.pem", pem_key(rogue_key))}


@contextlib.contextmanager
def served_tiny(app_name: str, **sections):
    """configs/tiny.yaml served by Ray Serve with these top-level sections merged in (a dict each,
    replacing the file's keys it names); yields run(prompt, k) -> the gRPC Generate reply (24
    tokens, k None: the server's policy). Serve is shut down afterwards."""
    from pathlib import Path

    import grpc
    import yaml
    from ray import serve
    from specserve.v1 import generation_pb2 as pb
    from specserve.v1 import generation_pb2_grpc as pb_grpc

    from specserve.cluster import app
    from specserve.cluster.config import parse_config

    data = yaml.safe_load((Path(__file__).resolve().parent.parent / "configs" / "tiny.yaml").read_text())
    for key, values in sections.items():
        data[key] = {**data.get(key, {}), **values}
    data["serve"] = {"app_name": app_name, "grpc_port": free_port(), "http_port": free_port(), "host": "127.0.0.1",
                     "max_new_tokens": 24}
    config = parse_config(data)
    app.start(config)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{config.serve.grpc_port}") as channel:
            stub = pb_grpc.SpeculativeGenerationStub(channel)

            def run(prompt: str, k: int | None):
                extra = {} if k is None else {"num_draft_tokens": k}
                return stub.Generate(pb.GenerateRequest(prompt=prompt, max_new_tokens=24, **extra),
                                     metadata=(("application", app_name),))

            yield run
    finally:
        serve.shutdown()
