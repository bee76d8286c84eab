"""The engine's plain decode rate (the bench's plain_decode) against the raw int8 forward (the bench's
raw_step_s), interleaved 3 times at 1 and 16 sequences, so that a shared machine's drift between the two
measurements cannot pass for the engine's overhead. Run from the repository root after
./setup.sh --models qwen-coder: .venv/bin/python docs/engine-vs-raw-qwen.py (2 minutes)."""
import sys, os
sys.path.insert(0, os.getcwd())
from specserve.cluster.config import load_config
from specserve.cluster.runtime.factory import load_target, make_engine
from specserve.cluster.runtime.engine import GenerationRequest
from specserve.cluster.bench import plain_decode, load_prompts
from specserve.cluster.bench_reference import raw_step_s
cfg = load_config("configs/qwen-coder.yaml")
target = load_target(cfg)
plain = make_engine(cfg, target, drafter="ngram")
prompts = load_prompts(True)
plain.generate([GenerationRequest("Hi", 4)])
for rep in range(3):
    for b in (1, 16):
        d = plain_decode(plain, prompts, 40, 1, b)
        raw = raw_step_s(target.model, [(b, 1)])
        r = b / list(raw.values())[0]
        print(f"rep {rep} sequences {b}: engine {d['tokens_per_s']:.2f} tok/s, raw {r:.2f} tok/s, ratio {d['tokens_per_s'] / r:.2f}", flush=True)
