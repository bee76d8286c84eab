"""Where a round's time goes on Qwen2.5-Coder-1.5B (configs/qwen-coder.yaml, its default drafter, T = 0,
one sequence): per held-out prompt of docs/heldout-check.py, the wall time of the engine's rounds split
into drafting, the target's forward (verify), acceptance and the host work around them (plan, commit,
emit, detokenise), against plain decoding's rounds; then the target forward's operators (torch.profiler,
self CPU time). Run from the repository root after ./setup.sh --models qwen-coder:
.venv/bin/python docs/profile-round-qwen.py [config] (3 minutes)."""
import os, sys, time
sys.path.insert(0, os.path.join(os.getcwd(), "docs"))
from heldout_setup import heldout_prompts, plain_and_default
import torch
from torch.profiler import profile, ProfilerActivity
from specserve.cluster.runtime.engine import GenerationRequest
from specserve.cluster.speculation import SamplingParams
prompts = heldout_prompts()
cfg, plain, spec = plain_and_default(sys.argv[1] if len(sys.argv) > 1 else "configs/qwen-coder.yaml")

def rounds(engine, prompt, k):
    """Per decode round: (wall, draft, verify, accept, tokens emitted)."""
    out = []
    engine.add_request(GenerationRequest(prompt, 96, SamplingParams(temperature=0.0), k))
    while engine.has_unfinished():
        t = time.perf_counter()
        emitted = engine.step()
        wall, r = time.perf_counter() - t, engine.last_round
        if r.batch and not r.prefill_s:
            out.append((wall, r.draft_s, r.verify_s, r.sample_s, sum(len(o.new_token_ids) for o in emitted)))
    return out


print(f"{'prompt':10s} {'engine':10s} {'rounds':>6s} {'tok/round':>9s} {'ms/round':>8s} {'draft':>6s} {'verify':>6s} "
      f"{'accept':>6s} {'host':>6s} {'ms/token':>8s}")
for cat, ps in prompts.items():
    for i, p in enumerate(ps):
        for name, engine, k in (("plain", plain, 0), (cfg.draft.drafter, spec, None)):
            rs = rounds(engine, p, k)
            n, tokens = len(rs), sum(r[4] for r in rs)
            ms = [1e3 * sum(r[j] for r in rs) / n for j in range(4)]
            print(f"{cat + str(i + 1):10s} {name:10s} {n:6d} {tokens / n:9.2f} {ms[0]:8.1f} {ms[1]:6.1f} {ms[2]:6.1f} "
                  f"{ms[3]:6.1f} {ms[0] - ms[1] - ms[2] - ms[3]:6.1f} {ms[0] * n / tokens:8.1f}", flush=True)

# the target's forward by operator over one speculative generation (code prompt 1)
with profile(activities=[ProfilerActivity.CPU]) as prof:
    rs = rounds(spec, prompts["code"][0], None)
total = sum(r[0] for r in rs)
events = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
print(f"\nself CPU time by operator, one {cfg.draft.drafter} generation ({len(rs)} rounds, {total:.2f} s wall, "
      f"{torch.get_num_threads()} threads):")
for e in events[:8]:
    print(f"  {e.key:55s} {e.self_cpu_time_total / 1e3:9.1f} ms  {e.count:6d} calls")
