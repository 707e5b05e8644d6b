"""MAGVIT-v2 building blocks with the module names of Show-o's ``models/common_modules.py`` and
``models/modeling_magvitv2.py`` (showlab/Show-o @45a5a2d), so that the upstream ``showlab/magvitv2`` state dict loads
unchanged.

Only the parts the released checkpoint uses are built: no timestep embedding (``temb_proj``), no conv shortcut, and no
per-level attention (upstream's ``attn_resolutions=[5]`` never matches a resolution, so its per-level ``attn`` lists
are always empty and hold no weights). The only attention is the one in each mid block.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def norm(channels: int, groups: int) -> nn.GroupNorm:
    """GroupNorm as upstream ``Normalize``: eps 1e-6, affine."""
    if channels % groups:
        raise ValueError(f"GroupNorm groups={groups} must divide channels={channels}")
    return nn.GroupNorm(num_groups=groups, num_channels=channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    """GN → swish → conv3×3 → GN → swish → dropout → conv3×3, plus the (1×1 ``nin_shortcut``) skip."""

    def __init__(self, in_channels: int, out_channels: int, groups: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = norm(in_channels, groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = norm(out_channels, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1)
        else:
            self.nin_shortcut = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        if self.nin_shortcut is not None:
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention with 1×1 ``q``/``k``/``v``/``proj_out`` convs and a residual."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm = norm(channels, groups)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        y = self.norm(x)
        # [B,C,H,W] -> [B,1,HW,C]; softmax(q·kᵀ/√C)·v over the HW positions, as upstream's bmm version.
        q, k, v = (t.reshape(b, 1, c, h * w).transpose(-1, -2) for t in (self.q(y), self.k(y), self.v(y)))
        out = F.scaled_dot_product_attention(q, k, v)
        out = out.transpose(-1, -2).reshape(b, c, h, w)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    """Stride-2 3×3 conv after an asymmetric zero pad (left 0, right 1, top 0, bottom 1)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0.0))


class Upsample(nn.Module):
    """Nearest-neighbour ×2, then a 3×3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class MidBlock(nn.Module):
    """``block_1`` (Res) → ``attn_1`` (Attn) → ``block_2`` (Res) at constant width."""

    def __init__(self, channels: int, groups: int, dropout: float):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, groups, dropout)
        self.attn_1 = AttnBlock(channels, groups)
        self.block_2 = ResnetBlock(channels, channels, groups, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class Level(nn.Module):
    """One resolution level: ``block`` (ResnetBlocks) then an optional ``downsample`` or ``upsample``."""

    def __init__(self, in_ch: int, out_ch: int, num_blocks: int, groups: int, dropout: float,
                 downsample: bool = False, upsample: bool = False):
        super().__init__()
        self.block = nn.ModuleList(
            ResnetBlock(in_ch if i == 0 else out_ch, out_ch, groups, dropout) for i in range(num_blocks))
        if downsample:
            self.downsample = Downsample(out_ch)
        if upsample:
            self.upsample = Upsample(out_ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for blk in self.block:
            x = blk(x)
        if hasattr(self, "downsample"):
            x = self.downsample(x)
        if hasattr(self, "upsample"):
            x = self.upsample(x)
        return x


class Encoder(nn.Module):
    """Upstream ``VQGANEncoder``: image [B,3,H,W] → pre-quantisation latents [B,z,H/2^L,W/2^L].

    ``conv_in`` → ``down[i]`` (level ``i`` has ``num_res_blocks[i]`` blocks of width ``ch·ch_mult[i]``, entered from
    ``ch·ch_mult[i-1]``; every level but the last ends in a ``downsample``) → ``mid`` → ``norm_out`` → swish →
    ``conv_out`` (3×3 → z) → ``quant_conv`` (1×1 z → z).
    """

    def __init__(self, in_channels: int, ch: int, ch_mult, num_res_blocks, z_channels: int, groups: int,
                 dropout: float = 0.0):
        super().__init__()
        n = len(ch_mult)
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
        in_mult = (1,) + tuple(ch_mult)
        self.down = nn.ModuleList(
            Level(ch * in_mult[i], ch * ch_mult[i], num_res_blocks[i], groups, dropout, downsample=i != n - 1)
            for i in range(n))
        width = ch * ch_mult[-1]
        self.mid = MidBlock(width, groups, dropout)
        self.norm_out = norm(width, groups)
        self.conv_out = nn.Conv2d(width, z_channels, 3, padding=1)
        self.quant_conv = nn.Conv2d(z_channels, z_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        h = self.mid(h)
        h = self.conv_out(F.silu(self.norm_out(h)))
        return self.quant_conv(h)


class Decoder(nn.Module):
    """Upstream ``VQGANDecoder``: quantised latents [B,z,h,w] → image [B,3,h·2^L,w·2^L] in ≈[-1,1].

    ``post_quant_conv`` (1×1 z → z) → ``conv_in`` (3×3 z → ``ch·ch_mult[-1]``) → ``mid`` → levels run from the last
    (coarsest) to ``up[0]``; level ``i`` has ``num_res_blocks[i]`` blocks of width ``ch·ch_mult[i]`` entered from the
    previous level's width, and every level but ``up[0]`` ends in an ``upsample``. ``up[0]`` is the full-resolution
    level (upstream builds the list with ``insert(0, …)``). Then ``norm_out`` → swish → ``conv_out`` (3×3 → 3).
    """

    def __init__(self, out_channels: int, ch: int, ch_mult, num_res_blocks, z_channels: int, groups: int,
                 dropout: float = 0.0):
        super().__init__()
        n = len(ch_mult)
        width = ch * ch_mult[-1]
        self.post_quant_conv = nn.Conv2d(z_channels, z_channels, 1)
        self.conv_in = nn.Conv2d(z_channels, width, 3, padding=1)
        self.mid = MidBlock(width, groups, dropout)
        levels = []
        for i in reversed(range(n)):
            out = ch * ch_mult[i]
            levels.insert(0, Level(width, out, num_res_blocks[i], groups, dropout, upsample=i != 0))
            width = out
        self.up = nn.ModuleList(levels)
        self.norm_out = norm(width, groups)
        self.conv_out = nn.Conv2d(width, out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(self.post_quant_conv(z))
        h = self.mid(h)
        for level in reversed(self.up):
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class LFQuantizer(nn.Module):
    """Look-up-free quantiser with ``bits`` binary channels (codebook size 2^bits), channel 0 = most significant bit.

    Buffers (both in the state dict, as upstream): ``embedding`` [2^bits, bits] float, row ``i`` = the bits of ``i``
    (MSB first) mapped to ±1; ``power_vals`` [bits] long = 2^(bits-1) … 2^0.
    """

    def __init__(self, bits: int):
        super().__init__()
        self.bits = bits
        self.codebook_size = 2 ** bits
        power_vals = 2 ** torch.arange(bits - 1, -1, -1, dtype=torch.long)
        codes = torch.arange(self.codebook_size, dtype=torch.long)
        binary = (codes.unsqueeze(1) // power_vals) % 2
        self.register_buffer("embedding", binary.float() * 2 - 1)
        self.register_buffer("power_vals", power_vals)

    @staticmethod
    def quantize(z: torch.Tensor) -> torch.Tensor:
        """z [B,C,h,w] → ±1 of the same dtype: +1 where z > 0, −1 where z ≤ 0 (upstream uses ``z > 0``)."""
        return torch.where(z > 0, 1.0, -1.0).to(z.dtype)

    def indices(self, z: torch.Tensor) -> torch.Tensor:
        """z [B,C,h,w] (pre- or post-quantisation) → code ids [B,h·w] long, raster order t = row·w + col."""
        bits = (z > 0).long()
        idx = (bits * self.power_vals.view(1, -1, 1, 1)).sum(1)
        return idx.flatten(1)

    def get_codebook_entry(self, ids: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
        """ids [B,h·w] → ±1 latents [B,C,h,w] via ``embedding[ids]``, raster order."""
        h, w = shape
        b = ids.shape[0]
        z_q = self.embedding[ids.reshape(-1)].view(b, h, w, -1)
        return z_q.permute(0, 3, 1, 2).contiguous()
