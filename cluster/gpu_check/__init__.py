"""`scripts/gpu-check.sh`: one command that checks a CUDA machine and writes a report.

Each part runs as its own subprocess (`python -m specserve.cluster.gpu_check --part NAME`) under its own
time limit, so a failure, a hang or a crash in one part never stops the others:

- environment: the GPU, its memory, CUDA, driver, torch and NCCL versions (resolves the device);
- exactness: greedy speculative output against plain greedy, per dtype, drafter and shape;
- distribution: sampled chain and tree paths against the exact distribution (chi-square),
  each with a negative control that must be rejected;
- costs: forwards of 1..17 tokens at batch 1..64, through the engine's KV wrapper and raw;
- speed: `specserve bench --quick` rows at batch 1, and the same variants batched;
- serve: `specserve serve`, one gRPC and one OpenAI chat request against in process;
- qwen_exactness, qwen_speed: the same for Qwen2.5-Coder-1.5B where it is installed.

`--cpu` runs the same parts on the CPU with tiny models and small sizes (the CI test). The report
is DIR/report.json (schema below, runner.SCHEMA) and DIR/report.txt; each part's log is
DIR/logs/NAME.log.
"""
