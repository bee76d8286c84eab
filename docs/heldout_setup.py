"""What the held-out scripts share: the prompts of docs/heldout-check.py (never used for training or
tuning) and, for a config, its target with a plain engine and an engine of its default drafter, warmed up."""
import ast
import os
import sys

sys.path.insert(0, os.getcwd())
from specserve.cluster.config import load_config  # noqa: E402
from specserve.cluster.runtime.engine import GenerationRequest  # noqa: E402
from specserve.cluster.runtime.factory import load_target, make_engine  # noqa: E402


def heldout_prompts() -> dict[str, list[str]]:
    src = open("docs/heldout-check.py").read()
    return ast.literal_eval(src[src.index("prompts = {") + len("prompts = "):src.index("}\nengines") + 1])


def plain_and_default(config_path: str):
    """(config, plain engine, the default drafter's engine) on one loaded target."""
    cfg = load_config(config_path)
    target = load_target(cfg)
    plain, spec = make_engine(cfg, target, drafter="ngram"), make_engine(cfg, target)
    for e in (plain, spec):
        e.generate([GenerationRequest("Hi", 4)])
    return cfg, plain, spec
