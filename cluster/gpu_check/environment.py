"""The environment part: the device this check runs on and the versions that matter for it."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
from importlib import metadata

from .common import Context, Recorder

PACKAGES = ("transformers", "ray", "deepspeed", "grpcio", "openai")


def run(ctx: Context, rec: Recorder) -> None:
    import torch

    from ..runtime.models import cpu_flags, select_device

    device = select_device("cpu" if ctx.cpu else ctx.device)
    rec.put("device", str(device))
    rec.put("mode", ctx.mode)
    rec.put("torch", torch.__version__)
    rec.put("torch_threads", torch.get_num_threads())
    rec.put("python", platform.python_version())
    rec.put("platform", platform.platform())
    rec.put("cpu", {"model": cpu_model(), "cores": os.cpu_count(),
                    "native_bf16": sorted(f for f in cpu_flags() if f in ("avx512_bf16", "amx_bf16"))})
    rec.put("load_average", [round(x, 2) for x in os.getloadavg()])
    rec.put("packages", {name: version(name) for name in PACKAGES})
    rec.put("cuda_available", torch.cuda.is_available())
    rec.put("cuda", torch.version.cuda)  # the CUDA torch was built with
    if device.type == "cuda":
        rec.put("gpu", gpu(torch, device))
        rec.put("cudnn", torch.backends.cudnn.version())
        rec.put("nccl", nccl(torch))
        rec.put("driver", driver())
        g = rec.data["gpu"]
        rec.put("summary", f"{g['name']} ({g['memory_gib']} GiB), CUDA {torch.version.cuda}, driver {rec.data['driver']}, "
                           f"torch {torch.__version__}, NCCL {rec.data['nccl']}")
    else:
        rec.put("summary", f"CPU: {rec.data['cpu']['model']} ({os.cpu_count()} cores), torch {torch.__version__}, "
                           f"load {rec.data['load_average'][0]}")
    if not ctx.cpu and device.type != "cuda":
        rec.problem(f"no CUDA device: device {ctx.device!r} resolves to {device} (torch {torch.__version__}, built with "
                    f"CUDA {torch.version.cuda}, torch.cuda.is_available() {torch.cuda.is_available()}); "
                    "--cpu runs the dry run")


def gpu(torch, device) -> dict:
    props = torch.cuda.get_device_properties(device)
    return {"name": props.name, "memory_gib": round(props.total_memory / 2**30, 1),
            "capability": f"{props.major}.{props.minor}", "count": torch.cuda.device_count(),
            "bf16_supported": torch.cuda.is_bf16_supported()}


def nccl(torch) -> str | None:
    try:
        v = torch.cuda.nccl.version()
    except (AttributeError, RuntimeError):
        return None
    return ".".join(map(str, v)) if isinstance(v, tuple) else str(v)


def driver() -> str | None:
    """The NVIDIA driver's version, from nvidia-smi (torch does not report it)."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None
    try:
        out = subprocess.run([smi, "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.split("\n")[0].strip() or None


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None
