"""Show-o's Phi body (phi-1.5 + per-head q/k LayerNorm), written for the service.

Numerically the same network as Show-o's ``models/phi.py`` (``PhiForCausalLM`` with ``qk_layernorm=True``):

- q, k, v projections -> split into heads -> per-head ``LayerNorm(head_dim)`` on q and k -> partial RoPE on the
  first ``head_dim * partial_rotary_factor`` dims (rotate_half, base ``rope_theta``) -> attention;
- parallel block ``h = x + dense(attn(LN(x))) + fc2(gelu_new(fc1(LN(x))))`` with one ``input_layernorm``;
- ``final_layernorm`` then ``lm_head`` (with bias); logits are returned in fp32;
- no implicit causal mask: every caller passes a 4-D mask (Show-o's omni-attention masks are not causal);
- default ``position_ids = arange(P, P + Lq)`` with left pads included (Show-o numerics).

What stock HF Phi does not expose cleanly and this module does:

- ``past_key_values`` are plain per-layer ``(k, v)`` tensors ``[B, H, P, Dh]`` (post-LayerNorm, post-RoPE). A caller
  can compute the t2i text prefix once and reuse it for every MaskGIT step; ``torch.cat`` keeps the autograd graph,
  so gradients flow into cached K/V that require grad (e.g. leaf tensors whose ``.grad`` accumulates over steps).
- ``logits_positions`` / ``logits_rows`` apply the final LayerNorm and only a slice of ``lm_head`` rows (e.g. the 8192
  image-code rows) to only some positions.

Attribute names make ``state_dict()`` keys equal Show-o's keys with the leading ``"showo."`` removed.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

Index = slice | torch.Tensor | None
KV = tuple[torch.Tensor, torch.Tensor]


@dataclass
class ShowoPhiConfig:
    """Shapes of the Phi body. Defaults are the real Show-o 512x512 model (phi-1.5 resized to 58498 ids)."""

    vocab_size: int = 58498
    """Rows of embed_tokens / lm_head: text ids + specials (+ concept tokens) + codebook + 1 mask id."""
    hidden_size: int = 2048
    """Model width (phi-1.5: 2048)."""
    num_hidden_layers: int = 24
    """Number of parallel attention+MLP blocks (phi-1.5: 24)."""
    num_attention_heads: int = 32
    """Attention heads; head_dim = hidden_size / num_attention_heads (phi-1.5: 32 heads of 64)."""
    intermediate_size: int = 8192
    """MLP width (phi-1.5: 8192)."""
    partial_rotary_factor: float = 0.5
    """Fraction of each head's dims that get RoPE (phi-1.5: 0.5, i.e. 32 of 64)."""
    rope_theta: float = 1e4
    """RoPE base."""
    layer_norm_eps: float = 1e-5
    """Epsilon of every LayerNorm (input, q/k per head, final)."""
    max_position_embeddings: int = 2048
    """Longest sequence the model is meant for (informational; RoPE is computed on the fly)."""
    initializer_range: float = 0.02
    """Std of the normal init of Linear/Embedding weights (random init only; biases 0, LayerNorm 1/0)."""

    @classmethod
    def real(cls, vocab_size: int = 58498) -> ShowoPhiConfig:
        """phi-1.5 + Show-o 512x512 shapes; ``vocab_size`` 58498 before concept tokens are added."""
        return cls(vocab_size=vocab_size)

    @classmethod
    def tiny(cls, vocab_size: int = 1400) -> ShowoPhiConfig:
        """Tiny random-init shapes for CPU tests: hidden 64, 2 layers, 4 heads (head_dim 16, 8 rotary), inter 256.

        ``vocab_size`` normally comes from the tokenizer (``tok.vocab_size``)."""
        return cls(vocab_size=vocab_size, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                   intermediate_size=256, max_position_embeddings=2048)

    @property
    def head_dim(self) -> int:
        """Per-head width."""
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by "
                             f"num_attention_heads {self.num_attention_heads}")
        return self.hidden_size // self.num_attention_heads

    @property
    def rotary_dim(self) -> int:
        """Number of leading head dims that get RoPE (must be even)."""
        d = int(self.head_dim * self.partial_rotary_factor)
        if d % 2:
            raise ValueError(f"rotary dim {d} (head_dim {self.head_dim} x partial_rotary_factor "
                             f"{self.partial_rotary_factor}) must be even")
        return d


@dataclass
class PhiOutput:
    """Result of :meth:`ShowoPhi.forward`."""

    logits: torch.Tensor | None
    """fp32 ``[B, len(positions), len(rows)]``; None when ``compute_logits=False``."""
    past_key_values: list[KV] | None
    """Per layer ``(k, v)`` ``[B, H, P + Lq, Dh]`` (prefix + new) when ``use_cache``, else None."""
    hidden_states: torch.Tensor
    """Output of the last decoder layer, before ``final_layernorm``, all ``Lq`` positions ``[B, Lq, D]``."""


def rotary_cos_sin(position_ids: torch.Tensor, rotary_dim: int, theta: float,
                   dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin ``[B or 1, L, rotary_dim]`` for integer positions (computed in fp32, cast to ``dtype``)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, rotary_dim, 2, device=position_ids.device,
                                             dtype=torch.float32) / rotary_dim))
    freqs = position_ids.to(torch.float32)[..., None] * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _apply_partial_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x ``[B,H,L,Dh]``; RoPE on the first ``cos.shape[-1]`` dims, the rest passes through."""
    r = cos.shape[-1]
    cos, sin = cos[:, None], sin[:, None]
    x_rot, x_pass = x[..., :r], x[..., r:]
    return torch.cat((x_rot * cos + _rotate_half(x_rot) * sin, x_pass), dim=-1)


class PhiAttention(nn.Module):
    """Multi-head attention with per-head q/k LayerNorm and partial RoPE; SDPA with an explicit mask."""

    def __init__(self, config: ShowoPhiConfig):
        super().__init__()
        d, h = config.hidden_size, config.num_attention_heads
        self.num_heads, self.head_dim = h, config.head_dim
        self.q_proj = nn.Linear(d, d, bias=True)
        self.k_proj = nn.Linear(d, d, bias=True)
        self.v_proj = nn.Linear(d, d, bias=True)
        self.dense = nn.Linear(d, d, bias=True)
        self.q_layernorm = nn.LayerNorm(self.head_dim, eps=config.layer_norm_eps)
        self.k_layernorm = nn.LayerNorm(self.head_dim, eps=config.layer_norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor,
                past: KV | None = None) -> tuple[torch.Tensor, KV]:
        """x ``[B,Lq,D]`` -> (out ``[B,Lq,D]``, (k, v) ``[B,H,P+Lq,Dh]``)."""
        b, lq, _ = x.shape
        shape = (b, lq, self.num_heads, self.head_dim)
        q = self.q_layernorm(self.q_proj(x).view(shape).transpose(1, 2))
        k = self.k_layernorm(self.k_proj(x).view(shape).transpose(1, 2))
        v = self.v_proj(x).view(shape).transpose(1, 2)
        q = _apply_partial_rope(q, cos, sin)
        k = _apply_partial_rope(k, cos, sin)
        if past is not None:
            pk, pv = past
            if pk.shape[0] != b:
                pk, pv = pk.expand(b, -1, -1, -1), pv.expand(b, -1, -1, -1)
            k = torch.cat((pk.to(k.dtype), k), dim=2)
            v = torch.cat((pv.to(v.dtype), v), dim=2)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # scale 1/sqrt(Dh), as Phi
        out = out.transpose(1, 2).reshape(b, lq, -1)
        return self.dense(out), (k, v)


class PhiMLP(nn.Module):
    """fc1 -> gelu_new (tanh approximation) -> fc2."""

    def __init__(self, config: ShowoPhiConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x ``[..., D]`` -> ``[..., D]``."""
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class PhiDecoderLayer(nn.Module):
    """Parallel block: ``x + attn(LN(x)) + mlp(LN(x))`` with one shared input LayerNorm."""

    def __init__(self, config: ShowoPhiConfig):
        super().__init__()
        self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attn = PhiAttention(config)
        self.mlp = PhiMLP(config)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor,
                past_k: torch.Tensor | None = None, past_v: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns (hidden, k, v); k/v include the past prefix."""
        h = self.input_layernorm(x)
        past = None if past_k is None else (past_k, past_v)
        attn, (k, v) = self.self_attn(h, cos, sin, mask, past)
        return x + attn + self.mlp(h), k, v


class PhiModel(nn.Module):
    """Embedding + decoder layers + final LayerNorm (the ``model.*`` part of the state dict)."""

    def __init__(self, config: ShowoPhiConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(PhiDecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.final_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)


def prepare_attention_mask(mask: torch.Tensor | None, batch: int, lq: int, lkv: int, dtype: torch.dtype,
                           device: torch.device | None = None) -> torch.Tensor:
    """Validate a 4-D mask ``[B|1, 1|H, Lq, Lkv]`` and return it in a form SDPA accepts.

    bool stays bool (True = may attend). Floating masks are additive and are cast to ``dtype``. Integer masks (Show-o's
    int64 helpers: 0 = allowed, ``iinfo.min`` = blocked) become bool ``mask == 0``."""
    if mask is None:
        raise ValueError("attention_mask is required (ShowoPhi has no implicit causal mask)")
    if mask.dim() != 4 or tuple(mask.shape[-2:]) != (lq, lkv) or mask.shape[0] not in (1, batch):
        raise ValueError(f"attention_mask must be [B|1, 1, {lq}, {lkv}] for batch {batch}; got {tuple(mask.shape)}")
    mask = mask.to(device)
    if mask.dtype == torch.bool:
        return mask
    if mask.is_floating_point():
        return mask.to(dtype)
    return mask == 0


class ShowoPhi(nn.Module):
    """Show-o's Phi LM. ``state_dict()`` keys == Show-o keys minus ``"showo."`` (``model.*``, ``lm_head.*``)."""

    def __init__(self, config: ShowoPhiConfig):
        super().__init__()
        config.rotary_dim  # validates head_dim / rotary dim
        self.config = config
        self.model = PhiModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=True)
        self.gradient_checkpointing = False  # recompute each layer in backward (training, no KV cache only)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Random init from the global torch RNG: normal(0, initializer_range) weights, zero biases, LN = (1, 0)."""
        std = self.config.initializer_range
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                if m.weight.is_meta:
                    continue
                nn.init.normal_(m.weight, mean=0.0, std=std)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm) and not m.weight.is_meta:
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    @property
    def dtype(self) -> torch.dtype:
        """dtype of the parameters (compute dtype)."""
        return self.model.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        """Device of the parameters."""
        return self.model.embed_tokens.weight.device

    def compute_logits(self, hidden: torch.Tensor, logits_positions: Index = None,
                       logits_rows: Index = None) -> torch.Tensor:
        """final_layernorm + (a slice of) lm_head on (some of) the positions of pre-LN ``hidden [B,L,D]``; fp32."""
        if logits_positions is not None:
            hidden = hidden[:, logits_positions]
        hidden = self.model.final_layernorm(hidden)
        w, b = self.lm_head.weight, self.lm_head.bias
        if logits_rows is not None:
            w, b = w[logits_rows], b[logits_rows]
        return F.linear(hidden, w, b).float()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                position_ids: torch.Tensor | None = None, past_key_values: list[KV] | None = None,
                use_cache: bool = False, logits_positions: Index = None, logits_rows: Index = None,
                compute_logits: bool = True, inputs_embeds: torch.Tensor | None = None) -> PhiOutput:
        """Run the LM on ``input_ids [B, Lq]`` (or ``inputs_embeds [B, Lq, D]``).

        attention_mask: ``[B|1, 1, Lq, P+Lq]`` bool (True = may attend) or additive float. Required.
        position_ids: ``[Lq]`` or ``[B, Lq]``; default ``arange(P, P+Lq)`` (pads included, as in Show-o).
        past_key_values: per layer ``(k, v)`` ``[B|1, H, P, Dh]`` of a prefix (batch 1 is broadcast).
        use_cache: return per-layer ``(k, v)`` covering prefix + new positions.
        logits_positions / logits_rows: slice or index tensor of positions / lm_head rows (None = all).
        compute_logits: False skips final LN + lm_head (e.g. a prefix-only pass); ``logits`` is then None.
        """
        if inputs_embeds is None:
            inputs_embeds = self.model.embed_tokens(input_ids)
        x = inputs_embeds.to(self.dtype)
        b, lq, _ = x.shape
        n_layers = len(self.model.layers)
        if past_key_values is not None and len(past_key_values) != n_layers:
            raise ValueError(f"past_key_values has {len(past_key_values)} layers, model has {n_layers}")
        p = 0 if past_key_values is None else past_key_values[0][0].shape[2]
        if position_ids is None:
            position_ids = torch.arange(p, p + lq, device=x.device)
        if position_ids.dim() == 1:
            position_ids = position_ids[None]
        cos, sin = rotary_cos_sin(position_ids.to(x.device), self.config.rotary_dim, self.config.rope_theta,
                                  x.dtype)
        mask = prepare_attention_mask(attention_mask, b, lq, p + lq, x.dtype, x.device)
        new_past: list[KV] | None = [] if use_cache else None
        ckpt = self.gradient_checkpointing and self.training and torch.is_grad_enabled() and not use_cache
        for i, layer in enumerate(self.model.layers):
            pk, pv = past_key_values[i] if past_key_values is not None else (None, None)
            if ckpt:
                x, k, v = checkpoint(layer, x, cos, sin, mask, pk, pv, use_reentrant=False)
            else:
                x, k, v = layer(x, cos, sin, mask, pk, pv)
            if new_past is not None:
                new_past.append((k, v))
        logits = self.compute_logits(x, logits_positions, logits_rows) if compute_logits else None
        return PhiOutput(logits=logits, past_key_values=new_past, hidden_states=x)

    def num_parameters(self) -> int:
        """Total parameter count."""
        return sum(p.numel() for p in self.parameters())

