"""The held-out prompts of docs/heldout-check.py (never used for training or tuning) on Qwen2.5-Coder-1.5B:
configs/qwen-coder.yaml's default drafter against plain decoding, 96 tokens, T = 0 and 1, each prompt its
faster of 2 runs; prints the speedup, alpha and the mean K. Run from the repository root after
./setup.sh --models qwen-coder: .venv/bin/python docs/heldout-check-qwen.py [config] (6 minutes)."""
import os, sys, time, statistics
sys.path.insert(0, os.path.join(os.getcwd(), "docs"))
from heldout_setup import heldout_prompts, plain_and_default
from specserve.cluster.runtime.engine import GenerationRequest
from specserve.cluster.speculation import SamplingParams
prompts = heldout_prompts()
cfg, plain, spec = plain_and_default(sys.argv[1] if len(sys.argv) > 1 else "configs/qwen-coder.yaml")
for T in (0.0, 1.0):
    for cat, ps in prompts.items():
        rates, stats = {}, []
        for name, e, k in (("plain", plain, 0), (cfg.draft.drafter, spec, None)):
            best = []
            for p in ps:
                runs = []
                for rep in range(2):
                    t = time.perf_counter(); r = e.generate([GenerationRequest(p, 96, SamplingParams(temperature=T, seed=7 + rep), k)])[0]
                    runs.append(len(r.token_ids) / (time.perf_counter() - t))
                    if k is None: stats.append(r.stats)
                best.append(max(runs))
            rates[name] = statistics.mean(best)
        alpha = sum(s.accepted_tokens for s in stats) / max(1, sum(s.evaluated_tokens for s in stats))
        mean_k = statistics.mean(k for s in stats for k in s.rounds_k)
        print(f"T={T} {cat:9s} {cfg.draft.drafter} {rates[cfg.draft.drafter] / rates['plain']:.2f}x  alpha {alpha:.2f}  mean K {mean_k:.2f}"
              f"  (plain {rates['plain']:.1f} tok/s)", flush=True)
