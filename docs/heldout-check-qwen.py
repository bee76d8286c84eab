"""The held-out prompts of docs/heldout-check.py (never used for training or tuning) on Qwen2.5-Coder-1.5B:
configs/qwen-coder.yaml's default drafter against plain decoding, 96 tokens, T = 0 and 1. Run from the
repository root after ./setup.sh --models qwen-coder: .venv/bin/python docs/heldout-check-qwen.py (3 minutes)."""
import ast, os, sys, time, statistics
sys.path.insert(0, os.getcwd())
from specserve.cluster.config import load_config
from specserve.cluster.runtime.factory import load_target, make_engine
from specserve.cluster.runtime.engine import GenerationRequest
from specserve.cluster.speculation import SamplingParams
src = open("docs/heldout-check.py").read()
prompts = ast.literal_eval(src[src.index("prompts = {") + len("prompts = "):src.index("}\nengines") + 1])
cfg = load_config("configs/qwen-coder.yaml")
target = load_target(cfg)
plain, spec = make_engine(cfg, target, drafter="ngram"), make_engine(cfg, target)
for e in (plain, spec): e.generate([GenerationRequest("Hi", 4)])
for T in (0.0, 1.0):
    for cat, ps in prompts.items():
        rates = {}
        for name, e, k in (("plain", plain, 0), ("ngram_head", spec, None)):
            rs = []
            for p in ps:
                t = time.perf_counter(); r = e.generate([GenerationRequest(p, 96, SamplingParams(temperature=T, seed=7), k)])[0]
                rs.append(len(r.token_ids) / (time.perf_counter() - t))
            rates[name] = statistics.mean(rs)
        print(f"T={T} {cat:9s} ngram_head {rates['ngram_head'] / rates['plain']:.2f}x (plain {rates['plain']:.1f} tok/s)", flush=True)
