"""A feature-conditioned draft head (EAGLE-style): a draft that reads the target's own hidden states.

At position t the head takes f_t, the target's last hidden state there (what its output layer
reads), and the embedding of the next token x_{t+1}; one decoder layer over fc([e(x_{t+1}); f_t])
predicts f_{t+1}, and the target's own output layer, restricted to `vocab` (the corpus's most
frequent ids), turns that into q for x_{t+2}. Drafting further feeds the predicted feature back.
q is zero outside `vocab`, which stays lossless: the residual max(0, p - q) still produces any token.

The target's embedding and output layer are shared, frozen and never saved: a head file holds the
fc and the decoder layer, the vocabulary and a description of the target it was trained on.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

HEAD_FORMAT = 1


@dataclass(frozen=True)
class HeadOutput:
    logits: torch.Tensor  # [1, rows, V'] over the head's vocabulary
    hidden_states: tuple[torch.Tensor, ...]  # ([1, T, d],): the predicted features


def _layer_config(target_config, intermediate_size: int | None):
    from transformers import LlamaConfig

    d, heads = target_config.hidden_size, target_config.num_attention_heads
    rope = getattr(target_config, "rope_parameters", None) or {
        "rope_type": "default", "rope_theta": float(getattr(target_config, "rope_theta", 10000.0))}
    return LlamaConfig(
        hidden_size=d, intermediate_size=intermediate_size or target_config.intermediate_size,
        num_attention_heads=heads, num_key_value_heads=getattr(target_config, "num_key_value_heads", heads),
        head_dim=getattr(target_config, "head_dim", None) or d // heads, num_hidden_layers=1,
        rms_norm_eps=getattr(target_config, "rms_norm_eps", 1e-6), rope_parameters=dict(rope),
        max_position_embeddings=getattr(target_config, "max_position_embeddings", 2048),
        hidden_act=getattr(target_config, "hidden_act", "silu"), attention_bias=False,
    )


def target_signature(target: nn.Module) -> dict:
    """What a head must match in its target: sizes, and a checksum of the output layer's rows."""
    c = target.config
    w = target.get_output_embeddings().weight.detach()
    return {"hidden_size": int(c.hidden_size), "vocab_size": int(c.vocab_size),
            "output_checksum": round(float(w.float()[:64].sum()), 3)}


def load_trained_file(path: str | Path, field: str, what: str, file_format: int, signature: dict) -> dict:
    """A file trained for a target (a head, look-ahead embeddings), read without unpickling code and
    checked against the target's signature (sizes; the output layer's checksum where the signature
    has one); a clear error names the config field and what does not match."""
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError) as e:
        raise ValueError(f"{field}: cannot read a {what} from {path}: {e}") from None
    if not isinstance(data, dict) or data.get("format") != file_format:
        raise ValueError(f"{field}: {path} is not a specserve {what} (format {file_format})")
    got = data["signature"]
    for key in ("hidden_size", "vocab_size"):
        if got[key] != signature[key]:
            raise ValueError(f"{field}: {path} was trained for a target with {key} {got[key]}, this target has {signature[key]}")
    want = signature.get("output_checksum")
    if want is not None and abs(got["output_checksum"] - want) > 1e-2 * max(1.0, abs(want)):
        raise ValueError(f"{field}: {path} was trained for another target (its output layer differs)")
    return data


class DraftHead(nn.Module):
    """fc + one decoder layer over the target's frozen embedding and output layer (rows `vocab`)."""

    def __init__(self, target: nn.Module, vocab: torch.Tensor, intermediate_size: int | None = None):
        super().__init__()
        self.config = _layer_config(target.config, intermediate_size)
        self.config.vocab_size = int(vocab.numel())
        self.config._attn_implementation = "sdpa"  # training; serving switches it to specserve's flat attention
        d = self.config.hidden_size
        from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

        self.fc = nn.Linear(2 * d, d)
        self.layer = LlamaDecoderLayer(self.config, layer_idx=0)
        self.rotary = LlamaRotaryEmbedding(self.config)
        self.register_buffer("vocab", vocab.to(torch.long).clone())
        embed, out = target.get_input_embeddings(), target.get_output_embeddings()
        self._frozen = (embed, out)  # the target's: shared, not parameters of the head
        self.register_buffer("output_rows", out.weight.detach()[self.vocab].clone(), persistent=False)
        self.output = None  # int8 (quantized): an Int8Linear over output_rows; None: output_rows in float
        self.signature = target_signature(target)
        like = out.weight
        self.to(device=like.device, dtype=like.dtype)

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    def forward(self, input_ids: torch.Tensor, features: torch.Tensor, position_ids: torch.Tensor | None = None,
                logits_to_keep: torch.Tensor | int = 0, output_hidden_states: bool = False, use_cache: bool = False,
                **kwargs) -> HeadOutput:
        """input_ids [B, T] (x_{t+1}), features [B, T, d] (f_t) -> logits over vocab at the kept rows
        (logits_to_keep: row indices, or 0 for all) and the predicted features [B, T, d]."""
        embed, _ = self._frozen
        x = self.fc(torch.cat((embed(input_ids).to(features.dtype), features), dim=-1))
        if position_ids is None:
            position_ids = torch.arange(x.shape[1], device=x.device)[None].expand(x.shape[0], -1)
        h = self.layer(x, position_ids=position_ids, position_embeddings=self.rotary(x, position_ids), **kwargs)
        rows = h if isinstance(logits_to_keep, int) and logits_to_keep == 0 else h[:, logits_to_keep]
        return HeadOutput(rows @ self.output_rows.T if self.output is None else self.output(rows), (h,))

    def quantized(self, kernel: str) -> "DraftHead":
        """Beside an int8 target: the decoder layer's linears and the output rows in int8 as well
        (weights per output channel, activations per row: runtime/int8.py), a third of the draft
        step. fc stays float: its input joins an embedding and a feature of very different scales,
        and one int8 scale per row loses the embedding (the Qwen head's agreement fell from 0.38 to
        0.23 with it, not at all without). q is what it samples from, so drafting stays exact.
        In place; returns the head."""
        from .int8 import Int8Linear, quantize_model

        quantize_model(self, kernel, skip=lambda name: name == "fc")
        self.output = Int8Linear(self.output_rows, None, kernel)
        return self

    def trainable_state(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.state_dict().items() if k.startswith(("fc.", "layer."))}

    def save(self, path: str | Path, meta: dict | None = None) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        torch.save({
            "format": HEAD_FORMAT, "signature": self.signature, "vocab": self.vocab.cpu(),
            "intermediate_size": self.config.intermediate_size,
            "state": {k: v.detach().to("cpu", torch.bfloat16) for k, v in self.trainable_state().items()},
            "meta": meta or {},
        }, path)

    @classmethod
    def load(cls, path: str | Path, target: nn.Module) -> "DraftHead":
        """A saved head for `target` (its embedding and output layer are shared); a clear error
        names what does not match."""
        data = load_trained_file(path, "draft.head.path", "draft head", HEAD_FORMAT, target_signature(target))
        head = cls(target, data["vocab"], data["intermediate_size"])
        like = target.get_output_embeddings().weight
        missing, unexpected = head.load_state_dict({k: v.to(like.dtype) for k, v in data["state"].items()}, strict=False)
        if unexpected or set(missing) - {"vocab"}:
            raise ValueError(f"draft.head.path: {path} does not fit this head (missing {missing}, unexpected {unexpected})")
        return head.eval()
