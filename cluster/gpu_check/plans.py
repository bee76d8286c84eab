"""What each mode checks: the sizes, and the targets with their drafters. On a GPU the default
SmolLM2 target with its shipped head and PaSS embeddings (and Qwen2.5-Coder-1.5B where installed);
in the CPU dry run the tiny seeded model, with a head and look-ahead embeddings made untrained
here (they draft badly, but through the same code)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..config import SpecserveConfig, load_config
from .common import ROOT, Context, Skip, configured

TREE = {"max_nodes": 12, "max_branch": 3}  # the tree rows: a 12-node tree, at most 3 children a node
QWEN = "qwen2.5-coder-1.5b-instruct"
QWEN_DRAFT = "qwen2.5-coder-0.5b-instruct"
TINY = "tiny-llama"


@dataclass(frozen=True)
class Sizes:
    exact_tokens: int  # new tokens per exactness prompt
    cost_tokens: tuple[int, ...]  # block lengths of the costs part
    cost_batches: tuple[int, ...]
    cost_context: int  # cached tokens before each block
    batch: int  # the speed part's batched rows
    batch_tokens: int
    serve_tokens: int


SIZES = {
    "gpu": Sizes(exact_tokens=48, cost_tokens=(1, 5, 9, 17), cost_batches=(1, 16, 64), cost_context=64, batch=16,
                 batch_tokens=48, serve_tokens=64),
    "cpu": Sizes(exact_tokens=24, cost_tokens=(1, 5), cost_batches=(1, 4), cost_context=32, batch=4,
                 batch_tokens=16, serve_tokens=32),
}


@dataclass(frozen=True)
class TargetPlan:
    label: str  # the model, as the report names it
    config: SpecserveConfig  # device set, trees as TREE, drafter files for config.target.dtype
    dtypes: tuple[str, ...]  # the exactness part's dtypes
    drafters: tuple[str, ...]  # the exactness part's drafters
    speed_drafters: tuple[str, ...]  # the bench rows' (plain always runs)
    speed_temperatures: tuple[float, ...]
    drafts: dict[str, dict] = field(default_factory=dict)  # dtype -> the draft section made for it (tiny files)

    def at(self, dtype: str) -> SpecserveConfig:
        return configured(self.config, target={"dtype": dtype}, draft=self.drafts.get(dtype, {}))


def main_plan(ctx: Context) -> TargetPlan:
    """SmolLM2 on a GPU; the tiny model in the CPU dry run."""
    drafters, speed = ("head", "pass"), ("ngram_head", "head", "pass")
    if ctx.cpu:
        dtypes = ("float32", "bfloat16")
        drafts = {dtype: tiny_drafter_files(ctx.work, dtype) for dtype in dtypes}
        base = {"target": {"model": TINY, "dtype": "float32", "chat_template": False},
                "speculation": {"num_draft_tokens": "adaptive", "max_draft_tokens": 8}}
        config = configured(base, target={"device": ctx.device}, draft=drafts["float32"], speculation={"tree": TREE})
        return TargetPlan(TINY, config, dtypes, drafters, speed, (0.0, 1.0), drafts)
    config = configured(load_config(None), target={"device": ctx.device}, speculation={"tree": TREE})
    return TargetPlan(config.target.model, config, ("bfloat16", "float32"), drafters, speed, (0.0, 1.0))


def qwen_plan(ctx: Context) -> TargetPlan:
    """Qwen2.5-Coder-1.5B (configs/qwen-coder.yaml) in bfloat16: its int8 is CPU only. Drafters:
    prompt lookup, and the 0.5B sibling as a draft model where that is installed too."""
    if ctx.cpu:
        raise Skip("cpu dry run: the 1.5B target runs on the GPU only in this check")
    if not installed(QWEN):
        raise Skip(f"{QWEN} is not installed (./setup.sh --models qwen-coder)")
    config = configured(load_config(ROOT / "configs" / "qwen-coder.yaml"),
                        target={"device": ctx.device, "dtype": "bfloat16"}, speculation={"tree": TREE})
    drafters = ("ngram", "model") if installed(QWEN_DRAFT) else ("ngram",)
    return TargetPlan(QWEN, config, ("bfloat16", "float32"), drafters, ("ngram",), (0.0,))


def installed(name: str) -> bool:
    """A built-in model shipped as GGUF parts: converted into the cache, or every part installed."""
    from ..runtime.gguf_parts import PARTED, installed_part
    from ..runtime.models import cache_dir

    spec = PARTED[name]
    return (cache_dir() / name / "config.json").is_file() or all(
        installed_part(spec, i) is not None for i in range(1, spec.parts + 1))


def tiny_drafter_files(folder: Path, dtype: str, lookahead: int = 4) -> dict:
    """A draft head and look-ahead embeddings for the tiny target in `dtype`, untrained (seeded, the
    same bytes every time, so the calibration cache finds them again); the draft section using them.
    One pair per dtype: a file records the output layer's checksum, which the tiny model's bf16 copy
    moves past the loader's tolerance."""
    import torch

    from ..runtime.head import DraftHead
    from ..runtime.lookahead import LookaheadEmbeddings
    from ..runtime.models import load_model

    head, embeddings = folder / f"{TINY}-{dtype}.head.pt", folder / f"{TINY}-{dtype}.lookahead.pt"
    if not (head.is_file() and embeddings.is_file()):
        target = load_model(TINY, dtype, "cpu").model
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            DraftHead(target, torch.arange(int(target.config.vocab_size))).save(head)
        LookaheadEmbeddings.initial(target, lookahead).save(embeddings)
    return {"head": {"path": str(head)}, "pass": {"embeddings": str(embeddings)}}
