"""A one-off check of drafters on six prompts never used for training or tuning (two per category),
T = 0 and T = 1, 96 tokens, one request at a time, each prompt its faster of 2 runs; prints speedup
over plain decoding (+tree: draft trees of 8 nodes, speculation.tree). Run from the repository
root: .venv/bin/python docs/heldout-check.py"""
import os, sys, time, statistics
sys.path.insert(0, os.getcwd())
from specserve.cluster.config import load_config
from specserve.cluster.runtime.factory import load_target, make_engine
from specserve.cluster.runtime.engine import GenerationRequest
from specserve.cluster.speculation import SamplingParams
cfg = load_config(None)
target = load_target(cfg)
prompts = {
 "chat": ["What are some good habits for staying focused while studying at home?",
          "Describe how a bicycle's gears make it easier to ride up a hill."],
 "grounded": ["Rewrite the following note so it is more polite, keeping every detail:\n\nTom, the printer on the third floor is broken again. Call the repair company before Friday and tell them the paper tray jams whenever someone prints more than ten pages. Also order two boxes of A4 paper and put the receipt in the finance folder.",
              "Summarize this paragraph in two sentences, reusing its wording where you can:\n\nThe city council voted on Tuesday to extend the opening hours of the central library. Starting next month, the library will stay open until nine in the evening on weekdays and until six on Saturdays. The council said the change follows a survey in which most residents asked for later hours, and that two new staff members will be hired to cover the extra shifts."],
 "code": ["Write a Python function that returns the n-th Fibonacci number iteratively, with a docstring.",
          "Write a Python class Stack with push, pop, peek and is_empty methods, and a short usage example."],
}
engines = {"none": make_engine(cfg, target, drafter="ngram"), "ngram": make_engine(cfg, target, drafter="ngram"),
           "ngram_head": make_engine(cfg, target, drafter="ngram_head"), "head": make_engine(cfg, target, drafter="head"),
           "ngram_head+tree": make_engine(cfg, target, drafter="ngram_head"), "head+tree": make_engine(cfg, target, drafter="head")}
for name in ("ngram_head+tree", "head+tree"):
    engines[name].tree_nodes = 8  # speculation.tree: 8 nodes, 2 children a node
for e in engines.values(): e.generate([GenerationRequest("Hi", 4)])
for T in (0.0, 1.0):
    for cat, ps in prompts.items():
        rates = {}
        for name, e in engines.items():
            best = []
            for p in ps:
                times = []
                for rep in range(2):
                    k = 0 if name == "none" else None
                    t = time.perf_counter(); r = e.generate([GenerationRequest(p, 96, SamplingParams(temperature=T, seed=7 + rep), k)])[0]
                    times.append(len(r.token_ids) / (time.perf_counter() - t))
                best.append(max(times))
            rates[name] = statistics.mean(best)
        print(f"T={T} {cat:9s} " + "  ".join(f"{n} {rates[n] / rates['none']:.2f}x" for n in rates if n != "none") + f"  (plain {rates['none']:.1f} tok/s)", flush=True)
