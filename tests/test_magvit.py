"""MAGVIT-v2 tokenizer: LFQ bit conventions, tiny encode/decode, and upstream state-dict loading."""
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from backbone.magvit import MagvitConfig, MAGVITv2, load_magvit, random_magvit
from backbone.magvit_layers import LFQuantizer


@pytest.fixture(scope="module")
def tiny():
    return random_magvit(MagvitConfig.tiny(), seed=0).eval()


# ---------------- LFQ ----------------

@pytest.mark.parametrize("bits", [10, 13])
def test_lfq_index_bits_round_trip(bits):
    q = LFQuantizer(bits)
    if bits == 10:
        ids = torch.arange(2 ** bits).view(4, -1)  # every code
    else:
        ids = torch.randint(0, 2 ** bits, (3, 64), generator=torch.Generator().manual_seed(0))
    h = w = int(ids.shape[1] ** 0.5)
    z = q.get_codebook_entry(ids, (h, w))
    assert z.shape == (ids.shape[0], bits, h, w)
    assert set(z.unique().tolist()) <= {-1.0, 1.0}
    assert torch.equal(q.indices(z), ids)
    # indices() on continuous latents agrees with indices() of their quantised values
    zc = torch.randn(2, bits, 4, 4)
    assert torch.equal(q.indices(zc), q.indices(q.quantize(zc)))


def test_lfq_msb_first_hand_example():
    q = LFQuantizer(13)
    assert q.power_vals.tolist() == [2 ** i for i in range(12, -1, -1)]
    assert q.power_vals.dtype == torch.long
    # channel 0 (MSB) and channel 12 (LSB) set, channel 10 set: 4096 + 4 + 1
    z = -torch.ones(1, 13, 1, 1)
    z[0, [0, 10, 12]] = 0.5
    assert q.indices(z).tolist() == [[4096 + 4 + 1]]
    assert q.embedding[5].tolist() == [-1.0] * 10 + [1.0, -1.0, 1.0]
    # exactly zero counts as a 0 bit / -1 (upstream uses z > 0)
    assert q.indices(torch.zeros(1, 13, 1, 1)).item() == 0
    assert q.quantize(torch.zeros(1, 13, 1, 1)).eq(-1).all()


def test_lfq_raster_order():
    q = LFQuantizer(10)
    ids = torch.arange(12).view(1, 12) * 7  # 3 rows x 4 cols
    z = q.get_codebook_entry(ids, (3, 4))
    row, col = 2, 1
    assert torch.equal(z[0, :, row, col], q.embedding[ids[0, row * 4 + col]])
    assert torch.equal(q.indices(z), ids)


# ---------------- tiny encode / decode ----------------

def test_tiny_config_shape():
    cfg = MagvitConfig.tiny()
    assert (cfg.resolution, cfg.codebook_bits, cfg.grid_size, cfg.num_tokens, cfg.codebook_size) == (64, 10, 8, 64, 1024)
    real = MagvitConfig.real()
    assert (real.resolution, real.codebook_bits, real.grid_size, real.num_tokens, real.codebook_size) == \
        (512, 13, 32, 1024, 8192)
    with pytest.raises(ValueError):
        MagvitConfig(base_channels=20)  # GroupNorm(32) cannot divide 20


def test_tiny_encode_decode_shapes(tiny):
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, (2, 80, 100, 3), dtype=np.uint8)  # not square: resized + centre-cropped
    ids = tiny.encode(imgs)
    assert ids.dtype == torch.long and ids.shape == (2, tiny.num_tokens) == (2, 64)
    assert 0 <= int(ids.min()) and int(ids.max()) < tiny.codebook_size

    x = torch.rand(2, 3, 64, 64) * 2 - 1
    ids2 = tiny.encode(x)
    assert ids2.shape == (2, 64)

    out = tiny.decode(ids)
    assert out.shape == (2, 3, 64, 64) and out.dtype == torch.float32 and torch.isfinite(out).all()

    u8 = tiny.decode_uint8(ids)
    assert isinstance(u8, np.ndarray) and u8.dtype == np.uint8 and u8.shape == (2, 64, 64, 3)
    ref = (torch.clamp((out + 1) / 2, 0, 1) * 255).permute(0, 2, 3, 1).to(torch.uint8).numpy()
    assert np.array_equal(u8, ref)


def test_preprocess_is_show_o_normalisation(tiny):
    img = np.random.default_rng(1).integers(0, 256, (1, 64, 64, 3), dtype=np.uint8)
    x = tiny.preprocess(img)
    expected = (torch.from_numpy(img).permute(0, 3, 1, 2).float() / 255 - 0.5) / 0.5
    assert torch.allclose(x, expected)
    assert torch.equal(tiny.encode(img), tiny.encode(expected))


def test_bad_ids_rejected(tiny):
    with pytest.raises(ValueError, match="out of range"):
        tiny.decode(torch.full((1, 64), 1024))
    with pytest.raises(ValueError, match="out of range"):
        tiny.decode(torch.full((1, 64), -1))
    with pytest.raises(ValueError):
        tiny.decode(torch.zeros(1, 63, dtype=torch.long))
    with pytest.raises(ValueError):
        tiny.encode(torch.zeros(1, 3, 32, 32))


def test_follows_module_dtype():
    m = random_magvit(MagvitConfig.tiny(), seed=0).to(torch.bfloat16)
    out = m.decode(torch.zeros(1, 64, dtype=torch.long))
    assert out.dtype == torch.bfloat16
    assert m.encode(np.zeros((1, 64, 64, 3), np.uint8)).shape == (1, 64)


def test_random_init_is_seeded():
    a = random_magvit(MagvitConfig.tiny(), seed=3).state_dict()
    b = random_magvit(MagvitConfig.tiny(), seed=3).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


# ---------------- loading ----------------

def test_real_state_dict_layout_and_load(tmp_path):
    model = MAGVITv2(MagvitConfig.real())
    n = sum(p.numel() for p in model.parameters())
    assert n == 95_387_004  # ≈382 MB fp32, the size of showlab/magvitv2's pytorch_model.safetensors
    sd = model.state_dict()
    expected = {
        "encoder.conv_in.weight": (128, 3, 3, 3),
        "encoder.down.1.block.0.nin_shortcut.weight": (256, 128, 1, 1),
        "encoder.down.3.downsample.conv.weight": (512, 512, 3, 3),
        "encoder.down.4.block.3.conv2.weight": (512, 512, 3, 3),
        "encoder.mid.attn_1.proj_out.weight": (512, 512, 1, 1),
        "encoder.conv_out.weight": (13, 512, 3, 3),
        "encoder.quant_conv.weight": (13, 13, 1, 1),
        "decoder.post_quant_conv.weight": (13, 13, 1, 1),
        "decoder.conv_in.weight": (512, 13, 3, 3),
        "decoder.mid.block_2.norm2.weight": (512,),
        "decoder.up.0.block.0.conv1.weight": (128, 128, 3, 3),   # up[0] = full resolution
        "decoder.up.0.block.3.conv2.weight": (128, 128, 3, 3),
        "decoder.up.1.block.0.nin_shortcut.weight": (128, 256, 1, 1),
        "decoder.up.1.upsample.conv.weight": (128, 128, 3, 3),
        "decoder.up.3.block.0.nin_shortcut.weight": (256, 512, 1, 1),
        "decoder.up.4.block.2.conv1.weight": (512, 512, 3, 3),
        "decoder.norm_out.weight": (128,),
        "decoder.conv_out.weight": (3, 128, 3, 3),
        "quantize.embedding": (8192, 13),
        "quantize.power_vals": (13,),
    }
    for k, shape in expected.items():
        assert tuple(sd[k].shape) == shape, k
    assert "decoder.up.0.upsample.conv.weight" not in sd and "encoder.down.4.downsample.conv.weight" not in sd
    assert not any(".attn." in k or "temb" in k for k in sd)
    assert len(sd) == 382

    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "pytorch_model.safetensors"))
    del model
    loaded = load_magvit(tmp_path, MagvitConfig.real())
    lsd = loaded.state_dict()
    for k in ("decoder.up.0.block.0.conv1.weight", "encoder.conv_in.bias", "quantize.power_vals"):
        assert torch.equal(lsd[k], sd[k])
    assert not loaded.training


def _tiny_sd():
    return {k: v.contiguous() for k, v in random_magvit(MagvitConfig.tiny(), seed=5).state_dict().items()}


def test_tiny_load_round_trip(tmp_path, tiny):
    src = random_magvit(MagvitConfig.tiny(), seed=5).eval()
    f = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(f))
    for p in (tmp_path, f, str(f)):
        m = load_magvit(p, MagvitConfig.tiny())
        ids = torch.randint(0, 1024, (1, 64), generator=torch.Generator().manual_seed(0))
        assert torch.equal(m.decode(ids), src.decode(ids))


def test_wrong_shape_names_key(tmp_path):
    sd = _tiny_sd()
    sd["decoder.conv_in.weight"] = torch.zeros(64, 10, 1, 1)
    save_file(sd, str(tmp_path / "pytorch_model.safetensors"))
    with pytest.raises(ValueError, match=r"decoder\.conv_in\.weight.*\(64, 10, 1, 1\)"):
        load_magvit(tmp_path, MagvitConfig.tiny())


def test_missing_and_unexpected_keys(tmp_path):
    sd = _tiny_sd()
    del sd["quantize.power_vals"]
    save_file(sd, str(tmp_path / "a.safetensors"))
    with pytest.raises(ValueError, match=r"missing key quantize\.power_vals"):
        load_magvit(tmp_path / "a.safetensors", MagvitConfig.tiny())

    sd = _tiny_sd()
    sd["decoder.up.0.upsample.conv.weight"] = torch.zeros(32, 32, 3, 3)
    save_file(sd, str(tmp_path / "b.safetensors"))
    with pytest.raises(ValueError, match=r"unexpected key decoder\.up\.0\.upsample\.conv\.weight"):
        load_magvit(tmp_path / "b.safetensors", MagvitConfig.tiny())

    sd = _tiny_sd()
    sd["quantize.power_vals"] = sd["quantize.power_vals"].flip(0)  # LSB-first checkpoint
    save_file(sd, str(tmp_path / "c.safetensors"))
    with pytest.raises(ValueError, match="power_vals"):
        load_magvit(tmp_path / "c.safetensors", MagvitConfig.tiny())


def test_missing_file_names_path(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match="nope"):
        load_magvit(missing, MagvitConfig.tiny())
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        load_magvit(tmp_path, MagvitConfig.tiny())  # dir without weights
