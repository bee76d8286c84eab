"""int8 targets that stay exact: int8 weights with a scale per output channel, activations
quantized with one scale per row (per token), integer accumulation.

A row's output depends on that row alone, so a token's logits are bitwise the same alone, in a
verify block, in a tree and in a batch: the target's distribution never depends on the rest of the
batch. (fbgemm's dynamic quantization, as `torch.ao.quantization.quantize_dynamic` uses it, takes
one activation scale for the whole input tensor, and breaks exactly that: `per_tensor` below, the
negative control of the tests.)

Kernels (chosen at start by measurement, `choose_kernel`):
- `fbgemm`: fbgemm's dynamic int8 linear as torch ships it. It quantizes its input with one range
  taken from the whole tensor, so each row is first divided by its own max-abs (a row then spans at
  most [-1, 1]) and one anchor row holding exactly -1 and 1 is appended: the tensor's range, and so
  the quantization grid, is [-1, 1] whatever the other rows hold. The output row is multiplied back
  by its scale.
- `int_mm`: rows quantized symmetrically here (scale max-abs / 127), `torch._int_mm` (int8 x int8
  -> int32), scales applied after.
`reference_linear` computes the `int_mm` arithmetic slowly in int64: the oracle for both.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable

import torch

KERNELS = ("fbgemm", "int_mm")
VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")  # int8 dot products without 16-bit saturation
_TINY = torch.finfo(torch.float32).tiny


def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per output channel: (w_q [N, K] int8, scale [N] float32), w ~ w_q * scale."""
    w = weight.detach().float()
    scale = (w.abs().amax(dim=1) / 127).clamp_min(_TINY)
    return torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8), scale


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per row: (x_q [M, K] int8, scale [M, 1] float32)."""
    scale = (x.abs().amax(dim=1, keepdim=True) / 127).clamp_min(_TINY)
    return torch.round(x / scale).clamp(-127, 127).to(torch.int8), scale


def reference_linear(x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The slow oracle: per-row int8 activations, exact int64 accumulation. x [M, K] -> [M, N]."""
    x_q, x_scale = quantize_rows(x.float())
    acc = x_q.long() @ w_q.long().t()  # [M, N], exact
    out = acc.double() * x_scale.double() * w_scale.double()
    return (out if bias is None else out + bias.double()).float()


def _reduce_range() -> bool:
    """fbgemm's activations in 7 bits where the CPU's int8 dot products saturate at 16 bits (AVX2
    without VNNI); 8 bits where they accumulate in 32 bits."""
    from .models import cpu_flags

    return not any(f in cpu_flags() for f in VNNI_FLAGS)


class Int8Linear(torch.nn.Module):
    """A drop-in for torch.nn.Linear (CPU): int8 weights per output channel, int8 activations per row."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, kernel: str = "fbgemm", per_tensor: bool = False):
        super().__init__()
        if kernel not in KERNELS:
            raise ValueError(f"int8 kernel must be one of {', '.join(KERNELS)}, got {kernel!r}")
        if per_tensor and kernel != "fbgemm":
            raise ValueError("per_tensor (the negative control) runs on the fbgemm kernel only")
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.kernel, self.per_tensor = kernel, per_tensor
        w_q, w_scale = quantize_weight(weight)
        self.register_buffer("w_scale", w_scale)
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())
        if kernel == "fbgemm":
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # quantized tensor creation is marked deprecated
                q = torch._make_per_channel_quantized_tensor(w_q, w_scale.double(), torch.zeros_like(w_scale, dtype=torch.long), 0)
                self._packed = torch.ops.quantized.linear_prepack(q, None)
            self._anchor = torch.zeros(1, self.in_features)
            self._anchor[0, 0], self._anchor[0, -1] = 1.0, -1.0
            self._reduce_range = _reduce_range()
        else:
            self.register_buffer("w_q_t", w_q.t().contiguous())  # [K, N]

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, kernel={self.kernel}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape, dtype = x.shape, x.dtype
        flat = x.reshape(-1, self.in_features).float()
        if flat.shape[0] == 0:
            return x.new_zeros(*shape[:-1], self.out_features)
        if self.per_tensor:  # the negative control: one activation scale for the whole tensor
            out = torch.ops.quantized.linear_dynamic(flat, self._packed, self._reduce_range)
        elif self.kernel == "fbgemm":
            scale = flat.abs().amax(dim=1, keepdim=True).clamp_min(_TINY)  # [M, 1]
            rows = torch.cat((flat / scale, self._anchor))  # every row within [-1, 1]; the anchor fixes the grid
            out = torch.ops.quantized.linear_dynamic(rows, self._packed, self._reduce_range)[:-1] * scale
        else:
            x_q, x_scale = quantize_rows(flat)
            out = torch._int_mm(x_q, self.w_q_t).float() * x_scale * self.w_scale
        if self.bias is not None:
            out = out + self.bias
        return out.to(dtype).reshape(*shape[:-1], self.out_features)


def is_int8(model: torch.nn.Module) -> bool:
    return any(isinstance(m, Int8Linear) for m in model.modules())


def quantize_model(model: torch.nn.Module, kernel: str = "fbgemm", per_tensor: bool = False,
                   skip: Callable[[str], bool] = lambda name: False) -> torch.nn.Module:
    """Replaces every torch.nn.Linear (also DeepSpeed's sharded linears: anything with a 2-D
    `weight` whose forward is x @ weight.T + bias, see _linear_like) by an Int8Linear, in place.
    The rest of the model stays float32."""
    model.float()
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if _linear_like(child) and not skip(full):
                new = _replacement(child, kernel, per_tensor)
                if child is output:  # drafters read the output layer's rows (a head, signatures): kept,
                    new.weight = child.weight  # no extra memory where it is tied to the input embedding
                setattr(module, child_name, new)
    return model


def _linear_like(module: torch.nn.Module) -> bool:
    if isinstance(module, torch.nn.Linear):
        return True
    kind = type(module).__name__
    return kind in ("LinearAllreduce", "LmHeadLinearAllreduce") or (kind == "LinearLayer" and not module.gather_output)


def _replacement(child: torch.nn.Module, kernel: str, per_tensor: bool) -> torch.nn.Module:
    """DeepSpeed AutoTP's shards keep their layout: a column shard (LinearLayer) is a Linear over
    its output channels; a row shard (LinearAllreduce) sums its partial output over the group, then
    adds the bias; the lm_head's row shard first takes its slice of the input."""
    bias = getattr(child, "bias", None)
    kind = type(child).__name__
    if kind in ("LinearAllreduce", "LmHeadLinearAllreduce"):
        sizes = child._partition_sizes if kind == "LmHeadLinearAllreduce" else None
        part = None if sizes is None else (sum(sizes[: child.tp_index]), sizes[child.tp_index])
        empty = child.weight.shape[1] == 0  # AutoTP may give a rank no input channels of the lm_head
        linear = child.weight.shape[0] if empty else Int8Linear(child.weight, None, kernel, per_tensor)
        return _AllReduced(linear, bias, child.mp_group, part)
    return Int8Linear(child.weight, bias, kernel, per_tensor)


class _AllReduced(torch.nn.Module):
    """A row-parallel shard: the partial output over this rank's input channels (each rank's row
    scales are its own), summed over the tensor-parallel group, then the bias."""

    def __init__(self, linear: Int8Linear | int, bias: torch.Tensor | None, group, part: tuple[int, int] | None):
        super().__init__()
        # linear: an int N where this rank holds no input channels (its partial output is zeros [.., N])
        self.linear, self.group, self.part = linear, group, part  # part: (offset, size) of the input this rank reads
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.part is not None:
            x = x[..., self.part[0] : self.part[0] + self.part[1]]
        out = x.new_zeros(*x.shape[:-1], self.linear) if isinstance(self.linear, int) else self.linear(x)
        if self.group is not None:
            import deepspeed.comm as dist

            dist.inference_all_reduce(out, group=self.group)
        return out if self.bias is None else out + self.bias


def choose_kernel(shape: tuple[int, int] = (1536, 4096), rows: tuple[int, ...] = (1, 5, 16),
                  clock: Callable[[], float] = time.perf_counter, repeats: int = 7) -> tuple[str, dict[str, float]]:
    """The faster kernel on this machine at the round's shapes (sum of median times over `rows`);
    returns (kernel, {kernel: ms}). Kernels that fail here are left out."""
    k, n = shape
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(n, k, generator=gen) * 0.02
    times = {}
    for kernel in KERNELS:
        try:
            layer = Int8Linear(weight, None, kernel)
            total = 0.0
            for m in rows:
                x = torch.randn(m, k, generator=gen)
                layer(x)
                samples = []
                for _ in range(repeats):
                    t = clock()
                    layer(x)
                    samples.append(clock() - t)
                total += sorted(samples)[len(samples) // 2]
            times[kernel] = 1e3 * total
        except (RuntimeError, NotImplementedError):
            continue
    if not times:
        raise RuntimeError("no int8 kernel runs on this machine (fbgemm, torch._int_mm)")
    return min(times, key=times.get), times
