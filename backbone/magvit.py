"""MAGVIT-v2 image tokenizer (showlab/magvitv2) used by Show-o: encoder, look-up-free quantiser (LFQ) and decoder.

The module tree and names follow Show-o's ``models/modeling_magvitv2.py`` (see ``backbone/magvit_layers.py``), so the
upstream ``pytorch_model.safetensors`` (keys ``encoder.*``, ``decoder.*``, ``quantize.embedding``,
``quantize.power_vals``) loads as is with :func:`load_magvit`. Weights are never made up silently: a random module
comes only from :func:`random_magvit` (or constructing :class:`MAGVITv2` directly).

Token convention: ids are code indices 0..2^bits-1 (not Show-o vocabulary ids), raster order ``t = row·W + col``,
bit ``c`` of a code is latent channel ``c`` with channel 0 the most significant bit.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, fields

import numpy as np
import torch
import torch.nn as nn

from backbone.magvit_layers import Decoder, Encoder, LFQuantizer

WEIGHT_FILES = ("pytorch_model.safetensors", "model.safetensors")


@dataclass(frozen=True)
class MagvitConfig:
    """Shape of a MAGVIT-v2 tokenizer. ``real()`` is showlab/magvitv2 at 512 px; ``tiny()`` is for tests."""

    resolution: int = 512
    """Square image side in pixels that ``encode`` resizes/crops to and ``decode`` produces."""
    codebook_bits: int = 13
    """LFQ bits = latent channels (upstream ``z_channels`` = ``codebook_dim``); codebook size is 2**bits."""
    base_channels: int = 128
    """Width of level 0 (upstream ``ch``); level i has ``base_channels * ch_mult[i]`` channels."""
    encoder_ch_mult: tuple[int, ...] = (1, 2, 2, 4, 4)
    """Encoder channel multipliers per level; len - 1 stride-2 downsamples."""
    encoder_num_res_blocks: tuple[int, ...] = (4, 3, 4, 3, 4)
    """ResnetBlocks per encoder level."""
    decoder_ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    """Decoder channel multipliers per level (``up[0]`` = full resolution); len - 1 ×2 upsamples."""
    decoder_num_res_blocks: tuple[int, ...] = (4, 4, 3, 4, 3)
    """ResnetBlocks per decoder level, indexed like ``decoder_ch_mult``."""
    norm_groups: int = 32
    """GroupNorm groups (eps 1e-6); must divide every block width."""
    image_channels: int = 3
    """Input and output image channels."""
    dropout: float = 0.0
    """Dropout inside ResnetBlocks (0 upstream)."""

    def __post_init__(self):
        for name in ("encoder_ch_mult", "encoder_num_res_blocks", "decoder_ch_mult", "decoder_num_res_blocks"):
            object.__setattr__(self, name, tuple(int(v) for v in getattr(self, name)))
        if len(self.encoder_ch_mult) != len(self.encoder_num_res_blocks):
            raise ValueError("encoder_ch_mult and encoder_num_res_blocks differ in length")
        if len(self.decoder_ch_mult) != len(self.decoder_num_res_blocks):
            raise ValueError("decoder_ch_mult and decoder_num_res_blocks differ in length")
        if len(self.encoder_ch_mult) != len(self.decoder_ch_mult):
            raise ValueError("encoder and decoder need the same number of levels")
        if self.resolution % 2 ** self.num_downsamples:
            raise ValueError(f"resolution {self.resolution} not divisible by 2**{self.num_downsamples}")
        for m in self.encoder_ch_mult + self.decoder_ch_mult + (1,):
            if (self.base_channels * m) % self.norm_groups:
                raise ValueError(f"norm_groups={self.norm_groups} does not divide width {self.base_channels * m}")

    @property
    def z_channels(self) -> int:
        """Latent channels (= ``codebook_bits``)."""
        return self.codebook_bits

    @property
    def num_downsamples(self) -> int:
        return len(self.encoder_ch_mult) - 1

    @property
    def grid_size(self) -> int:
        """Token grid side (32 for real)."""
        return self.resolution // 2 ** self.num_downsamples

    @property
    def num_tokens(self) -> int:
        return self.grid_size ** 2

    @property
    def codebook_size(self) -> int:
        return 2 ** self.codebook_bits

    @classmethod
    def real(cls) -> "MagvitConfig":
        """showlab/magvitv2 as used by show-o-512x512: 512 px, 13 bits, 32×32 = 1024 tokens, ≈95 M params."""
        return cls()

    @classmethod
    def tiny(cls) -> "MagvitConfig":
        """Test-size tokenizer: 64 px, 10 bits, 3 downsamples → 8×8 = 64 tokens, widths 32/64, GroupNorm(8)."""
        return cls(resolution=64, codebook_bits=10, base_channels=32,
                   encoder_ch_mult=(1, 2, 2, 2), encoder_num_res_blocks=(1, 1, 1, 1),
                   decoder_ch_mult=(1, 1, 2, 2), decoder_num_res_blocks=(1, 1, 1, 1),
                   norm_groups=8)

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


class MAGVITv2(nn.Module):
    """MAGVIT-v2 tokenizer: ``encoder`` + ``quantize`` (LFQ) + ``decoder``, upstream state-dict names.

    ``encode`` maps images to code ids [B,N] (N = grid²), ``decode`` maps ids back to float images in ≈[-1,1],
    ``decode_uint8`` to uint8 HWC. Both run without autograd and follow the module's device and dtype.
    Constructing this class gives PyTorch's default random init; use :func:`load_magvit` for real weights.
    """

    def __init__(self, config: MagvitConfig | None = None):
        super().__init__()
        self.config = config = config or MagvitConfig.real()
        self.encoder = Encoder(config.image_channels, config.base_channels, config.encoder_ch_mult,
                               config.encoder_num_res_blocks, config.z_channels, config.norm_groups, config.dropout)
        self.decoder = Decoder(config.image_channels, config.base_channels, config.decoder_ch_mult,
                               config.decoder_num_res_blocks, config.z_channels, config.norm_groups, config.dropout)
        self.quantize = LFQuantizer(config.codebook_bits)

    # ---- shape properties ----
    @property
    def num_tokens(self) -> int:
        return self.config.num_tokens

    @property
    def codebook_size(self) -> int:
        return self.config.codebook_size

    @property
    def grid_size(self) -> int:
        return self.config.grid_size

    @property
    def resolution(self) -> int:
        return self.config.resolution

    def _device_dtype(self) -> tuple[torch.device, torch.dtype]:
        p = self.encoder.conv_in.weight
        return p.device, p.dtype

    # ---- images → ids ----
    def preprocess(self, images) -> torch.Tensor:
        """uint8 [B,H,W,3] array (or list of [H,W,3] arrays) → float [B,3,R,R] in [-1,1] on the module's device.

        As Show-o's ``image_transform``: resize the shortest side to R (bicubic, PIL), centre-crop R×R, /255, then
        (x − 0.5)/0.5.
        """
        from PIL import Image
        from torchvision.transforms import InterpolationMode
        from torchvision.transforms import functional as TF

        if isinstance(images, np.ndarray):
            if images.ndim != 4:
                raise ValueError(f"expected uint8 images [B,H,W,3], got shape {images.shape}")
            images = list(images)
        r = self.resolution
        out = []
        for img in images:
            img = np.asarray(img)
            if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
                raise ValueError(f"expected a uint8 [H,W,3] image, got {img.dtype} {img.shape}")
            pil = Image.fromarray(img)
            pil = TF.resize(pil, r, interpolation=InterpolationMode.BICUBIC)
            pil = TF.center_crop(pil, r)
            out.append(torch.from_numpy(np.asarray(pil, dtype=np.uint8).copy()))
        if not out:
            raise ValueError("no images given")
        x = torch.stack(out).permute(0, 3, 1, 2).float().div(255.0)
        device, dtype = self._device_dtype()
        return ((x - 0.5) / 0.5).to(device=device, dtype=dtype)

    @torch.no_grad()
    def encode(self, images) -> torch.Tensor:
        """Images → code ids LongTensor [B,N] on the module's device.

        ``images``: uint8 numpy [B,H,W,3] (any size; resized and centre-cropped, see :meth:`preprocess`) or a float
        tensor [B,3,R,R] already in [-1,1].
        """
        if isinstance(images, torch.Tensor):
            if not images.is_floating_point() or images.ndim != 4 or images.shape[1] != 3:
                raise ValueError(f"expected a float tensor [B,3,H,W] in [-1,1], got {images.dtype} {tuple(images.shape)}")
            if tuple(images.shape[2:]) != (self.resolution, self.resolution):
                raise ValueError(f"expected {self.resolution}x{self.resolution} images, got {tuple(images.shape[2:])}")
            device, dtype = self._device_dtype()
            x = images.to(device=device, dtype=dtype)
        else:
            x = self.preprocess(images)
        z = self.encoder(x)
        return self.quantize.indices(z)

    # ---- ids → images ----
    def _check_ids(self, ids) -> torch.Tensor:
        ids = torch.as_tensor(ids)
        if ids.ndim != 2 or ids.shape[1] != self.num_tokens:
            raise ValueError(f"expected ids [B,{self.num_tokens}], got {tuple(ids.shape)}")
        if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
            raise ValueError(f"ids must be integers, got {ids.dtype}")
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.codebook_size):
            raise ValueError(f"ids out of range [0,{self.codebook_size}): min {int(ids.min())}, max {int(ids.max())}")
        return ids.to(device=self._device_dtype()[0], dtype=torch.long)

    @torch.no_grad()
    def decode(self, ids) -> torch.Tensor:
        """Code ids [B,N] → float images [B,3,R,R] in ≈[-1,1] (not clamped), module dtype and device."""
        ids = self._check_ids(ids)
        z_q = self.quantize.get_codebook_entry(ids, (self.grid_size, self.grid_size))
        return self.decoder(z_q.to(self._device_dtype()[1]))

    def decode_uint8(self, ids) -> np.ndarray:
        """Code ids [B,N] → np.uint8 [B,R,R,3] via clamp((x+1)/2, 0, 1)·255 (truncated, as upstream)."""
        x = self.decode(ids).float()
        x = torch.clamp((x + 1.0) / 2.0, 0.0, 1.0) * 255.0
        return x.permute(0, 2, 3, 1).to(torch.uint8).cpu().numpy()


def random_magvit(config: MagvitConfig | None = None, seed: int = 0) -> MAGVITv2:
    """Explicitly random-initialised tokenizer (tests, tiny runs, benchmarks); deterministic for a given seed."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return MAGVITv2(config)


def _resolve_weights(path) -> str:
    path = os.fspath(path)
    if os.path.isdir(path):
        for name in WEIGHT_FILES:
            f = os.path.join(path, name)
            if os.path.isfile(f):
                return f
        raise FileNotFoundError(f"no MAGVIT weights ({' or '.join(WEIGHT_FILES)}) in {path}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"MAGVIT weights not found: {path}")
    return path


def load_magvit(path, config: MagvitConfig | None = None, device: str | torch.device = "cpu") -> MAGVITv2:
    """Load upstream MAGVIT-v2 weights from ``path`` (a directory holding ``pytorch_model.safetensors`` or
    ``model.safetensors``, or the file itself) into a ``config``-shaped module (default real) in eval mode.

    Raises FileNotFoundError naming ``path`` if no file is there, and ValueError naming the first missing or
    unexpected key or shape mismatch, or if the LFQ buffers are not the MSB-first constants. Never falls back to
    random weights. Tensors keep the module's dtypes (float32, ``power_vals`` long).
    """
    from safetensors.torch import load_file

    config = config or MagvitConfig.real()
    file = _resolve_weights(path)
    state = load_file(file, device=str(device))

    with torch.device("meta"):
        model = MAGVITv2(config)
    expected = model.state_dict()
    for key, ref in expected.items():
        if key not in state:
            raise ValueError(f"{file}: missing key {key} (expected shape {tuple(ref.shape)})")
        if tuple(state[key].shape) != tuple(ref.shape):
            raise ValueError(f"{file}: shape mismatch for {key}: checkpoint {tuple(state[key].shape)}, "
                             f"expected {tuple(ref.shape)}")
    for key in state:
        if key not in expected:
            raise ValueError(f"{file}: unexpected key {key} (shape {tuple(state[key].shape)})")

    state = {k: v.to(expected[k].dtype) for k, v in state.items()}
    ref_q = LFQuantizer(config.codebook_bits).to(device)
    for name in ("power_vals", "embedding"):
        if not torch.equal(state[f"quantize.{name}"], getattr(ref_q, name)):
            raise ValueError(f"{file}: quantize.{name} differs from the MSB-first LFQ constants")

    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()
