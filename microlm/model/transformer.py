"""The MicroLM TransformerLM (stage A5): a small Llama-style decoder, nanoGPT-readable.

token embedding → N × [RMSNorm → causal self-attention (RoPE, optional GQA, SDPA) → residual,
RMSNorm → SwiGLU MLP → residual] → RMSNorm → LM head.

Shapes in the comments: B batch, T tokens of this call, C model dim (``dim``), H query heads, Hkv
key/value heads (``kv_heads``; H with no GQA), D head dim (C / H), V vocab.

The reference config ``microlm-31.7m`` (hidden 512, 8 layers, 8 heads of 64, SwiGLU 1365, vocab
6400, untied embeddings) has exactly 31,724,032 parameters (a test pins it).

A preallocated ``KVCache`` supports a prefill of the prompt and then one-token decode steps; the
cached and uncached forward passes agree (tested).  Decoding loops live in ``microlm.infer``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from microlm.errors import MicroLMError
from microlm.model.config import MODEL_PRESETS, ModelConfig

__all__ = ["ModelConfig", "TransformerLM", "KVCache", "RMSNorm", "rope_tables", "apply_rope", "MODEL_PRESETS",
           "count_parameters"]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x · w / sqrt(mean(x²) + eps), computed in fp32; PyTorch's fused kernel does the same sums
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:  # no casts (decode is latency-bound)
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        return F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps).type_as(x)


def rope_tables(head_dim: int, length: int, theta: float = 10000.0, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of ``position × frequency``, shape ``(length, head_dim / 2)``."""
    # (D/2,): frequency i is theta^(-2i/D), from 1 rad/token down to ~1/theta (long wavelengths)
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    angles = torch.outer(torch.arange(length, device=device, dtype=torch.float32), freqs)  # (length, D/2)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs ``(x[..., i], x[..., i + D/2])`` (the Llama/"rotate-half" layout) of
    ``x: (B, H, T, D)`` by the angles of their positions; ``cos, sin: (T, D/2)``, or ``(B, 1, T, D/2)``
    when each row has its own positions (a left-padded batch)."""
    d = x.shape[-1] // 2  # D/2: x1 and x2 below are (..., D/2), each broadcast against cos and sin
    if x.dtype != torch.float32:
        return apply_rope(x.float(), cos, sin).type_as(x)
    x1, x2 = x[..., :d], x[..., d:]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class KVCache:
    """Preallocated keys and values for every layer: ``(batch, kv_heads, max_len, head_dim)``.

    ``pos`` moves once per forward (``advance``, after the last layer), so every layer of one call
    writes at the same offset."""

    def __init__(self, cfg: ModelConfig, batch_size: int, max_len: int | None = None, *,
                 device=None, dtype=torch.float32):
        self.max_len = max_len or cfg.max_seq_len
        shape = (batch_size, cfg.kv_heads, self.max_len, cfg.head_dim)  # (B, Hkv, max_len, D)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)]
        self.pos = 0  # tokens already stored

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this call's ``k, v: (B, Hkv, T, D)`` after the cached ones; all of them,
        ``(B, Hkv, pos + T, D)``."""
        t = k.shape[2]
        end = self.pos + t
        if end > self.max_len:
            raise MicroLMError(f"KV cache full: {end} tokens > max_len {self.max_len}")
        self.k[layer][:, :, self.pos:end] = k
        self.v[layer][:, :, self.pos:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def advance(self, t: int) -> None:
        self.pos += t

    def reset(self) -> None:
        self.pos = 0

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)


class Attention(nn.Module):
    # bf16 on a CPU: the explicit softmax trains ~1.15× faster than SDPA's fused CPU kernel (×1.4 under
    # torch.compile, which fuses the mask and softmax), measured by benchmarks/bench_precision.py, which
    # turns this off for its baseline rows; fp32, CUDA and one-token decode keep SDPA
    explicit_cpu_bf16 = True

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv, self.hd = cfg.n_heads, cfg.kv_heads, cfg.head_dim
        # q, k and v in one matrix: one GEMM instead of three (rows: q heads, then k heads, then v
        # heads); the HF export splits it into q_proj / k_proj / v_proj
        self.qkv_proj = nn.Linear(cfg.dim, (cfg.n_heads + 2 * self.n_kv) * self.hd, bias=False)
        self.o_proj = nn.Linear(cfg.n_heads * self.hd, cfg.dim, bias=False)
        self.dropout = cfg.dropout

    def forward(self, x, cos, sin, cache: KVCache | None = None, layer: int = 0, need_weights: bool = False,
                mask: torch.Tensor | None = None):
        b, t, _ = x.shape  # x: (B, T, C)
        # (B, T, (H + 2·Hkv)·D) -> qk: (B, T, (H + Hkv)·D) and v: (B, T, Hkv·D)
        qk, v = self.qkv_proj(x).split([(self.n_heads + self.n_kv) * self.hd, self.n_kv * self.hd], dim=-1)
        # rotate q and k heads in one go, then split them
        # (B, T, H + Hkv, D) -> (B, H + Hkv, T, D)
        qk = apply_rope(qk.view(b, t, self.n_heads + self.n_kv, self.hd).transpose(1, 2), cos, sin)
        q, k = qk.split([self.n_heads, self.n_kv], dim=1)  # q: (B, H, T, D), k: (B, Hkv, T, D)
        v = v.view(b, t, self.n_kv, self.hd).transpose(1, 2)  # (B, T, Hkv, D) -> (B, Hkv, T, D)
        past = 0
        if cache is not None:
            past = cache.pos
            k, v = cache.update(layer, k, v)  # the cached tokens too: (B, Hkv, past + T, D)
        if self.n_kv != self.n_heads:  # GQA: each kv head serves n_heads / n_kv query heads
            rep = self.n_heads // self.n_kv
            # (B, Hkv, S, D) -> (B, H, S, D); interleave, not tile: query head h reads kv head h // rep,
            # as Hugging Face's repeat_kv does (so exported GQA weights mean the same thing)
            k = k.repeat_interleave(rep, dim=1)
            v = v.repeat_interleave(rep, dim=1)
        drop = self.dropout if self.training else 0.0
        weights = None
        explicit = need_weights or (self.explicit_cpu_bf16 and x.device.type == "cpu" and q.dtype == torch.bfloat16
                                    and t > 1 and mask is None and drop == 0.0)
        if explicit:  # explicit softmax (and the notebook's attention heatmap)
            att = (q @ k.transpose(-2, -1)) / math.sqrt(self.hd)  # (B, H, T, past + T)
            if mask is None:  # (T, past + T): query i sits at position past + i and sees keys 0..past + i
                mask = torch.ones(t, past + t, dtype=torch.bool, device=x.device).tril(diagonal=past)
            att = att.masked_fill(~mask, float("-inf")).softmax(-1)
            weights = att if need_weights else None
            y = att.to(v.dtype) @ v  # (B, H, T, D)
        elif mask is not None:  # left-padded batch: (B, 1, T, past + T), True = may attend
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=drop)
        elif past == 0:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=t > 1, dropout_p=drop)
        elif t == 1:  # one new token attends to everything cached
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=drop)
        else:  # a chunk after a cached prefix: causal within the chunk, full over the prefix
            # (SDPA's is_causal aligns its triangle top-left: query i would see keys 0..i only)
            mask = torch.ones(t, past + t, dtype=torch.bool, device=x.device).tril(diagonal=past)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=drop)
        y = y.transpose(1, 2).contiguous().view(b, t, self.n_heads * self.hd)  # (B, H, T, D) -> (B, T, H·D)
        return self.o_proj(y), weights  # (B, T, C)


class SwiGLU(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.hidden = cfg.hidden_dim
        # gate and up in one matrix (rows: gate, then up); split again by the HF export
        self.gate_up_proj = nn.Linear(cfg.dim, 2 * cfg.hidden_dim, bias=False)
        self.down_proj = nn.Linear(cfg.hidden_dim, cfg.dim, bias=False)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x):  # x: (B, T, C)
        gate, up = self.gate_up_proj(x).split(self.hidden, dim=-1)  # (B, T, 2·hidden) -> 2 × (B, T, hidden)
        return self.dropout(self.down_proj(F.silu(gate) * up))  # the gate scales up elementwise; (B, T, C)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.post_attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = SwiGLU(cfg)

    def forward(self, x, cos, sin, cache=None, layer=0, need_weights=False, mask=None):
        a, w = self.attn(self.input_norm(x), cos, sin, cache, layer, need_weights, mask)
        x = x + a
        x = x + self.mlp(self.post_attn_norm(x))
        return x, w


class TransformerLM(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg.validate()
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.drop = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        cos, sin = rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Normal(0, 0.02) weights; the projections that write into the residual stream
        (``o_proj``, ``down_proj``) scaled by 1/sqrt(2·layers) so the stream's variance stays put."""
        std = 0.02
        for name, p in self.named_parameters():
            if p.dim() == 1:
                nn.init.ones_(p)
            elif name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, 0.0, std / math.sqrt(2 * self.cfg.n_layers))
            else:
                nn.init.normal_(p, 0.0, std)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, *, cache: KVCache | None = None,
                need_weights: bool = False, ignore_index: int = -100, pad_mask: torch.Tensor | None = None):
        """Logits ``(B, T, vocab)``, and the mean cross-entropy when ``targets`` are given
        (positions equal to ``ignore_index`` do not count).  With ``cache``, ``idx`` continues the
        cached sequence and the cache advances by ``T``.

        ``pad_mask`` (left-padded batches): ``(B, past + T)`` bool, True for real tokens, covering the
        cached tokens and ``idx``.  Pads are never attended to and each row's positions count its
        real tokens only (as ``position_ids = cumsum(attention_mask) - 1`` in transformers), so a
        padded row computes what it would alone."""
        b, t = idx.shape  # idx: (B, T) token ids
        start = cache.pos if cache is not None else 0  # tokens already cached (past)
        if start + t > self.rope_cos.shape[0]:
            raise MicroLMError(f"sequence of {start + t} tokens exceeds max_seq_len {self.cfg.max_seq_len}")
        mask = None
        if pad_mask is None:
            cos, sin = self.rope_cos[start:start + t], self.rope_sin[start:start + t]  # (T, D/2)
        else:
            if pad_mask.shape != (b, start + t):
                raise MicroLMError(f"pad_mask has shape {tuple(pad_mask.shape)}, expected {(b, start + t)}")
            # (B, T): each new token's position among its row's real tokens (leading pads: -1, clamped to 0)
            pos = (pad_mask.long().cumsum(-1) - 1).clamp(min=0)[:, start:]
            # (B, T, D/2) -> (B, 1, T, D/2): one angle table per row, broadcast over the heads
            cos, sin = self.rope_cos[pos].unsqueeze(1), self.rope_sin[pos].unsqueeze(1)
            # (T, S) with S = start + T: query i (position start + i) sees keys 0..start + i
            causal = torch.ones(t, start + t, dtype=torch.bool, device=idx.device).tril(diagonal=start)
            # a pad query still sees itself, so no softmax row is empty (no NaN to leak into values)
            diag = torch.zeros_like(causal)
            diag[:, start:] = torch.eye(t, dtype=torch.bool, device=idx.device)
            # (T, S) & (B, 1, S) -> (B, T, S) -> (B, 1, T, S): pads hidden as keys; broadcast over heads
            mask = ((causal & pad_mask[:, None, :]) | diag).unsqueeze(1)
        x = self.drop(self.embed(idx))  # (B, T, C)
        weights = []
        for i, layer in enumerate(self.layers):
            x, w = layer(x, cos, sin, cache, i, need_weights, mask)
            weights.append(w)
        if cache is not None:
            cache.advance(t)
        logits = self.lm_head(self.norm(x))  # (B, T, V)
        loss = None
        if targets is not None:  # (B·T, V) against (B·T,); in fp32 even when the logits are bf16
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1),
                                   ignore_index=ignore_index)
        if need_weights:
            return logits, loss, weights
        return logits, loss

    def hidden(self, idx: torch.Tensor) -> torch.Tensor:
        """The final (normed) hidden states ``(B, T, dim)`` of a plain forward: ``lm_head`` of them are
        the logits (what a loss over a few positions needs, without the logits of all of them)."""
        t = idx.shape[1]
        if t > self.rope_cos.shape[0]:
            raise MicroLMError(f"sequence of {t} tokens exceeds max_seq_len {self.cfg.max_seq_len}")
        cos, sin = self.rope_cos[:t], self.rope_sin[:t]
        x = self.drop(self.embed(idx))
        for i, layer in enumerate(self.layers):
            x, _ = layer(x, cos, sin, None, i, False, None)
        return self.norm(x)

    def cast(self, dtype: torch.dtype) -> TransformerLM:
        """Weights (and so the KV cache and activations) in ``dtype`` for inference — e.g. bfloat16
        halves the bytes each decoded token reads.  The RoPE tables stay fp32 (the rotation and the
        norms compute in fp32 whatever the weights)."""
        self.to(dtype)
        self.rope_cos, self.rope_sin = self.rope_cos.float(), self.rope_sin.float()
        return self

    def decode_layout(self, on: bool = True) -> TransformerLM:
        """Store each weight matrix so that its longer side is contiguous in memory: same values, same
        shapes, another layout.

        Decoding one token at batch 1 is a chain of matrix-vector products that stream every weight
        once, and MKL's product streams a matrix fastest along long contiguous runs: ``nn.Linear``
        keeps ``W`` as ``(out, in)`` row-major, so a 512-wide input makes 2 KB runs (~10 GB/s on a
        2-core EPYC), while the same matrix stored column-major runs along ``out`` (6,400 for the LM
        head: ~18 GB/s).  So matrices with ``out > in`` (qkv, gate/up, the LM head) go column-major,
        the others (``down_proj``) stay.  ``benchmarks/bench_generate.py`` measures it (fp32, batch 1: the
        31.7M model ×1.44, the ``cpu`` profile's 6.4M model ×1.5, the same tokens).  At batch ≥ 8 and in training the usual
        layout is as fast or faster, so this is for one-stream inference (``microlm chat``);
        ``on=False`` restores it.  The parameters stay the same objects (``.data`` is swapped), so
        state dicts and exports are unchanged."""
        for mod in self.modules():
            if isinstance(mod, nn.Linear):
                w = mod.weight.data
                want = on and w.shape[0] > w.shape[1]  # column-major: the (longer) out side contiguous
                if want and w.stride(0) != 1:
                    mod.weight.data = w.t().contiguous().t()
                elif not want and not w.is_contiguous():
                    mod.weight.data = w.contiguous()
        return self

    def new_cache(self, batch_size: int, max_len: int | None = None) -> KVCache:
        p = next(self.parameters())
        return KVCache(self.cfg, batch_size, max_len, device=p.device, dtype=p.dtype)

    def num_parameters(self) -> int:
        return count_parameters(self)

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward ≈ 6·N + attention), as in nanoGPT/PaLM."""
        n = self.num_parameters() - self.embed.weight.numel() * (0 if self.cfg.tie_embeddings else 1)
        return 6 * n + 12 * self.cfg.n_layers * self.cfg.dim * seq_len


def count_parameters(model: nn.Module) -> int:
    """Unique parameters (a tied embedding counts once)."""
    seen = set()
    n = 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            n += p.numel()
    return n
