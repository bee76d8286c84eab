"""The serve part: `specserve serve` on the device once (its own local Ray), one gRPC Generate and one
OpenAI chat request, each against the same request in process (measured first, so the two never
share the machine), then a clean stop: Ctrl-C, and no process of the server's left behind."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import yaml

from ..app import free_port
from ..bench import load_prompts
from ..runtime.requests import ChatMessage, GenerationRequest
from ..runtime.factory import build_engine
from .common import ROOT, Context, Recorder, configured, log
from .plans import SIZES, TINY
from .processes import marked, stop_marked

READY = "Ctrl-C stops it."  # what `specserve serve` prints once every model has loaded
SERVER_MARK = "SPECSERVE_GPU_CHECK_SERVER"  # in the server's environment: its Ray processes inherit it
STOP_S = 30  # Ctrl-C to exit
REQUEST_S = 60
RESERVE_S = 15  # of the part's time, kept for the requests and the stop (past its limit the runner cleans up)


@dataclass(frozen=True)
class Timed:
    text: str
    tokens: int
    seconds: float

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds


def run(ctx: Context, rec: Recorder) -> None:
    config = serve_config(ctx)
    prompt = load_prompts(quick=True)[1][1]  # the grounded prompt: lookup has something to copy
    n = SIZES[ctx.mode].serve_tokens
    rec.put("model", config.target.model)
    local = in_process(config, prompt, n)
    rec.put("in_process", {k: as_json(v) for k, v in local.items()})
    path = ctx.work / "serve.yaml"
    path.write_text(yaml.safe_dump(config.model_dump()))
    mark = uuid.uuid4().hex
    server, server_log = start(path, config, mark, ctx.out / "logs" / "serve-server.log")
    try:
        started = time.perf_counter()
        wait_ready(server, server_log, ctx.deadline - RESERVE_S)
        rec.put("startup_s", round(time.perf_counter() - started, 1))
        served = served_requests(config, prompt, n)
        rec.put("served", {k: as_json(v) for k, v in served.items()})
    finally:
        rec.put("shutdown", stop(server, mark))
    compare(rec, local, served, exact=ctx.cpu and config.target.dtype == "float32")
    shutdown = rec.data["shutdown"]
    if shutdown["exit_code"] != 0 or shutdown["left_behind"]:
        rec.problem(f"the server did not stop cleanly: {shutdown}")


def serve_config(ctx: Context):
    """The default SmolLM2 app on the GPU (target rank 0 holds it), the tiny model in the dry run;
    one process, no draft replicas, loopback ports free now."""
    ports = {"grpc_port": free_port(), "http_port": free_port(), "host": "127.0.0.1"}
    cluster = {"tp_size": 1, "draft_replicas": 0}
    if ctx.cpu:
        base = {"target": {"model": TINY, "dtype": "float32", "chat_template": False}, "draft": {"drafter": "ngram"}}
        cluster |= {"target_rank": {"cpus": 1, "gpus": 0, "threads": 1}}
    else:
        from ..config import load_config

        base = load_config(None)
        if ctx.device.startswith("cuda"):
            cluster |= {"target_rank": {"gpus": 1}}  # Ray then gives the engine's process the GPU
    return configured(base, target={"device": ctx.device}, cluster=cluster, serve=ports)


def in_process(config, prompt: str, n: int) -> dict[str, Timed]:
    """The same two requests in this process (after a warm-up), before the server starts."""
    engine = build_engine(config)
    requests = {"grpc": GenerationRequest(prompt, n), "chat": GenerationRequest("", n, messages=(ChatMessage("user", prompt),))}
    engine.generate([GenerationRequest(prompt, 4)])
    out = {}
    for name, request in requests.items():
        t = time.perf_counter()
        result = engine.generate([request])[0]
        out[name] = Timed(result.text, len(result.token_ids), time.perf_counter() - t)
    return out


def start(path: Path, config, mark: str, log_path: Path) -> tuple[subprocess.Popen, Path]:
    script = shutil.which("specserve", path=str(Path(sys.executable).parent))  # the venv's entry point
    command = [script] if script else [sys.executable, "-m", "specserve.cluster.cli"]
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "SPECSERVE_API_TOKEN")} | {SERVER_MARK: mark}
    log_path.parent.mkdir(parents=True, exist_ok=True)
    s = config.serve
    log(f"starting specserve serve (gRPC {s.grpc_port}, HTTP {s.http_port}); its log: {log_path}")
    with open(log_path, "w") as f:
        proc = subprocess.Popen(command + ["serve", "--config", str(path), "--grpc-port", str(s.grpc_port),
                                           "--http-port", str(s.http_port)],
                                cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    return proc, log_path


def wait_ready(proc: subprocess.Popen, log_path: Path, deadline: float) -> None:
    while time.time() < deadline:
        if READY in log_path.read_text(errors="replace"):
            return
        if proc.poll() is not None:
            raise RuntimeError(f"specserve serve exited with {proc.returncode} before serving: {tail(log_path)}")
        time.sleep(0.25)
    raise TimeoutError(f"specserve serve was not serving by the part's deadline: {tail(log_path)}")


def served_requests(config, prompt: str, n: int) -> dict[str, Timed]:
    """A gRPC warm-up, then one timed gRPC Generate and one timed OpenAI chat request."""
    import grpc
    from openai import OpenAI
    from specserve.v1 import generation_pb2 as pb
    from specserve.v1 import generation_pb2_grpc as pb_grpc

    s = config.serve
    meta = (("application", s.app_name),)
    out = {}
    with grpc.insecure_channel(f"127.0.0.1:{s.grpc_port}") as channel:
        stub = pb_grpc.SpeculativeGenerationStub(channel)
        stub.Generate(pb.GenerateRequest(prompt=prompt, max_new_tokens=4), metadata=meta, timeout=REQUEST_S)
        t = time.perf_counter()
        reply = stub.Generate(pb.GenerateRequest(prompt=prompt, max_new_tokens=n), metadata=meta, timeout=REQUEST_S)
        out["grpc"] = Timed(reply.text, len(reply.token_ids), time.perf_counter() - t)
    client = OpenAI(base_url=f"http://127.0.0.1:{s.http_port}/v1", api_key="unused", timeout=REQUEST_S, max_retries=0)
    t = time.perf_counter()
    chat = client.chat.completions.create(model=config.target.model, max_tokens=n, temperature=0,
                                          messages=[{"role": "user", "content": prompt}])
    out["chat"] = Timed(chat.choices[0].message.content or "", chat.usage.completion_tokens, time.perf_counter() - t)
    client.close()
    return out


def stop(proc: subprocess.Popen, mark: str) -> dict:
    """Ctrl-C, as a user stops it (the server stops Serve and its own Ray); what is still running
    with its mark afterwards is killed by process id and counted."""
    exit_code = proc.poll()
    if exit_code is None:
        proc.send_signal(signal.SIGINT)
        try:
            exit_code = proc.wait(timeout=STOP_S)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            exit_code = proc.wait()
    deadline = time.time() + 10  # Ray's processes exit as its raylet stops them
    while marked(SERVER_MARK, mark) and time.time() < deadline:
        time.sleep(0.2)
    return {"exit_code": exit_code, "left_behind": stop_marked(SERVER_MARK, mark)}


def compare(rec: Recorder, local: dict[str, Timed], served: dict[str, Timed], exact: bool) -> None:
    ratios = {}
    for name in ("grpc", "chat"):
        a, b = local[name], served[name]
        if b.tokens == 0:
            rec.problem(f"{name}: the served request returned no tokens")
            continue
        ratios[name] = round(b.tokens_per_s / a.tokens_per_s, 3)
        same = a.text == b.text
        rec.put(f"{name}_same_text", same)
        if exact and not same:
            rec.problem(f"{name}: served greedy text differs from in process in float32")
    rec.put("served_over_in_process", ratios)
    rec.put("summary", ", ".join(f"{name} served/in-process {r}x ({served[name].tokens_per_s:.1f} vs "
                                 f"{local[name].tokens_per_s:.1f} tok/s)" for name, r in ratios.items())
            + f", up in {rec.data.get('startup_s')} s")


def as_json(t: Timed) -> dict:
    return {"tokens": t.tokens, "seconds": round(t.seconds, 4), "tokens_per_s": round(t.tokens_per_s, 2)}


def tail(path: Path, lines: int = 5) -> str:
    return " | ".join(path.read_text(errors="replace").strip().splitlines()[-lines:])
