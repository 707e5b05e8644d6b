"""Benchmark: the MaskGIT rollout sampler vs a straightforward reference loop (images/s and peak memory).

    python -m launch.bench.rollout                          # tiny config, CPU
    python -m launch.bench.rollout --real-shapes --timesteps 2 --batch 1   # Show-o 512 shapes, random weights
    python -m launch.bench.rollout --real-shapes --device cuda --dtype bfloat16 --batch 9   # + MFU

``sampler`` = :class:`backbone.maskgit.MaskGITSampler` (text-prefix K/V once per sample, image block only per step,
cond+uncond in one forward of 2B rows, only the code rows of ``lm_head`` at the N image positions, SDPA).
``reference`` = :func:`reference_generate` below: every step recomputes the full sequences, cond then uncond one
after the other, full-vocabulary logits, eager attention (explicit ``softmax(QKᵀ/√d + mask)·V``), written here with
the model's weights. Both use the same step math and per-sample generators, same dtype, same run; the table also
says whether they produced the same grids.

Each method runs in its own subprocess so peak memory is its own: on CPU the peak RSS (VmHWM, reset through
``/proc/self/clear_refs``) minus the RSS before the run; on CUDA ``torch.cuda.max_memory_allocated`` minus the
memory allocated before the run. Kept out of CI (real shapes take minutes on CPU).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

PROMPTS = ["a photo of a dog on the grass", "a red car parked in front of a house", "a cat sleeping on a sofa",
           "a person with a hat on a beach at sunset"]


# ------------------------------------------------------------------------------------------- setup
@dataclass
class RealShapeIds:
    """Show-o 512's id layout (phi-1.5 + 10 specials, 8192 codes): enough of a tokenizer for the sampler/masks."""

    pad_id: int = 50295
    """``[PAD]``."""
    soi_id: int = 50296
    """``<|soi|>``."""
    eoi_id: int = 50297
    """``<|eoi|>``."""
    t2i_id: int = 50300
    """``<|t2i|>``."""
    eot_id: int = 50256
    """``<|endoftext|>`` (bos = eos = sot = eot)."""
    image_offset: int = 50305
    """Id of code 0."""
    codebook_size: int = 8192
    """MAGVIT-v2 codes."""

    @property
    def mask_id(self) -> int:
        """58497."""
        return self.image_offset + self.codebook_size

    @property
    def vocab_size(self) -> int:
        """58498."""
        return self.mask_id + 1


def real_shape_t2i(ids: RealShapeIds, batch: int, num_image_tokens: int = 1024, text_tokens: int = 40,
                   seed: int = 0):
    """T2IInputs with Show-o's layout and random text ids (left-padded 129-token text block)."""
    from backbone.prompts import T2IInputs

    g = torch.Generator().manual_seed(seed)
    rows, urows = [], []
    for _ in range(batch):
        text = torch.randint(0, ids.eot_id, (text_tokens,), generator=g).tolist()
        block = [ids.t2i_id, ids.eot_id, *text, ids.eot_id]
        rows.append([ids.pad_id] * (129 - len(block)) + block)
        urows.append([ids.pad_id] * 126 + [ids.t2i_id, ids.eot_id, ids.eot_id])
    img = [ids.soi_id] + [ids.mask_id] * num_image_tokens + [ids.eoi_id]
    return T2IInputs(input_ids=torch.tensor([r + img for r in rows]),
                     uncond_input_ids=torch.tensor([r + img for r in urows]), text_len=129,
                     num_image_tokens=num_image_tokens, truncated=[False] * batch)


def build_setup(real_shapes: bool, batch: int, device: str, dtype: torch.dtype, seed: int = 0):
    """(model, tok, t2i) with random weights: tiny (builtin tokenizer, 8x8 image tokens) or Show-o 512 shapes."""
    from backbone.phi import ShowoPhi, ShowoPhiConfig

    torch.manual_seed(seed)
    if real_shapes:
        tok = RealShapeIds()
        with torch.device(device):
            model = ShowoPhi(ShowoPhiConfig.real(vocab_size=tok.vocab_size))
        t2i = real_shape_t2i(tok, batch, seed=seed)
    else:
        from backbone.prompts import build_t2i_inputs
        from backbone.tokenizer import ShowoTokenizer

        tok = ShowoTokenizer.build_for_tests()
        model = ShowoPhi(ShowoPhiConfig.tiny(vocab_size=tok.vocab_size)).to(device)
        t2i = build_t2i_inputs(tok, [PROMPTS[i % len(PROMPTS)] for i in range(batch)], 64)
    return model.to(dtype).eval(), tok, t2i


# ------------------------------------------------------------------------------------------- reference
def _rope(x: torch.Tensor, pos: torch.Tensor, rotary_dim: int, theta: float) -> torch.Tensor:
    inv = 1.0 / (theta ** (torch.arange(0, rotary_dim, 2, device=x.device, dtype=torch.float32) / rotary_dim))
    f = pos.float()[:, None] * inv
    emb = torch.cat([f, f], -1)
    cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
    xr, xp = x[..., :rotary_dim], x[..., rotary_dim:]
    half = rotary_dim // 2
    rot = torch.cat([-xr[..., half:], xr[..., :half]], -1)
    return torch.cat([xr * cos + rot * sin, xp], -1)


def eager_forward(model, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Full-sequence, full-vocabulary fp32 logits ``[B,L,V]`` with eager attention, from ShowoPhi's weights."""
    cfg = model.config
    b, length = ids.shape
    h_n, d_h = cfg.num_attention_heads, cfg.head_dim
    additive = torch.zeros(mask.shape, dtype=torch.float32, device=ids.device).masked_fill_(
        ~mask.bool(), torch.finfo(torch.float32).min)
    pos = torch.arange(length, device=ids.device)
    x = model.model.embed_tokens(ids)
    for layer in model.model.layers:
        h = layer.input_layernorm(x)
        a = layer.self_attn

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(b, length, h_n, d_h).transpose(1, 2)

        q = _rope(a.q_layernorm(heads(a.q_proj(h))), pos, cfg.rotary_dim, cfg.rope_theta)
        k = _rope(a.k_layernorm(heads(a.k_proj(h))), pos, cfg.rotary_dim, cfg.rope_theta)
        v = heads(a.v_proj(h))
        scores = (q @ k.transpose(-1, -2)).float() / math.sqrt(d_h) + additive
        out = (scores.softmax(-1).to(v.dtype) @ v).transpose(1, 2).reshape(b, length, -1)
        x = x + a.dense(out) + layer.mlp.fc2(F.gelu(layer.mlp.fc1(h), approximate="tanh"))
    return model.lm_head(model.model.final_layernorm(x)).float()


@torch.no_grad()
def reference_generate(model, tok, t2i, generators, timesteps: int, guidance_scale: float = 5.0,
                       tau0: float = 1.0) -> torch.Tensor:
    """The straightforward MaskGIT loop: per step, full cond sequence then full uncond sequence (eager attention,
    full-vocab logits), slice image positions and code columns, CFG, Show-o's step. Returns the final grid."""
    from backbone.maskgit import maskgit_step
    from backbone.prompts import t2i_attention_mask

    dev = model.device
    cond, uncond = t2i.input_ids.to(dev).clone(), t2i.uncond_input_ids.to(dev).clone()
    mc, mu = t2i_attention_mask(cond, tok), t2i_attention_mask(uncond, tok)
    sl = slice(t2i.text_len + 1, t2i.text_len + 1 + t2i.num_image_tokens)
    cols = slice(tok.image_offset, tok.image_offset + tok.codebook_size)
    tau, chosen = tau0, None
    for k in range(timesteps):
        lc = eager_forward(model, cond, mc)
        uncond[:, sl] = cond[:, sl]
        lu = eager_forward(model, uncond, mu)
        logits = ((1 + guidance_scale) * lc - guidance_scale * lu)[:, sl, cols]
        res = maskgit_step(logits, cond[:, sl], k, timesteps, tau, generators, tok.mask_id, tok.image_offset)
        cond[:, sl], tau, chosen = res.next_ids, res.tau, res.chosen
    return chosen


@torch.no_grad()
def sampler_generate(model, tok, t2i, generators, timesteps: int, guidance_scale: float = 5.0) -> torch.Tensor:
    """The service's sampler (prefix K/V reuse, batched CFG, sliced lm_head, SDPA)."""
    from backbone.config import SamplerConfig
    from backbone.maskgit import MaskGITSampler

    s = MaskGITSampler(model, tok, SamplerConfig(timesteps=timesteps, guidance_scale=guidance_scale))
    return s.generate(t2i, generators).final_ids


# ------------------------------------------------------------------------------------------- measuring
def _status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1])
    return 0


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def sampler_flops(cfg, batch: int, prefix: int, n: int, timesteps: int, codebook: int, cfg_rows: int = 2) -> float:
    """Model FLOPs of the sampler's useful work (matmuls + attention), for MFU."""
    d, inter, layers = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    per_tok = 2 * layers * (4 * d * d + 2 * d * inter)
    block = n + 2
    total_len = prefix + block
    pre = prefix * per_tok + layers * 4 * d * prefix * (prefix + 1) / 2
    step = block * per_tok + layers * 4 * d * block * total_len + 2 * n * d * codebook
    return float(cfg_rows * batch * (pre + timesteps * step))


def worker(args: argparse.Namespace) -> dict:
    """Run one method in this process and return its measurements."""
    dtype = getattr(torch, args.dtype)
    model, tok, t2i = build_setup(args.real_shapes, args.batch, args.device, dtype, args.seed)
    fn = reference_generate if args.worker == "reference" else sampler_generate
    cuda = args.device.startswith("cuda")
    times = []
    if cuda:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        base = _status_kb("VmRSS") * 1024
        _reset_peak_rss()
    final = None
    for _ in range(args.repeats):
        gens = [torch.Generator(device=args.device).manual_seed(args.seed + 1 + i) for i in range(args.batch)]
        t0 = time.perf_counter()
        final = fn(model, tok, t2i, gens, args.timesteps)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    peak = (torch.cuda.max_memory_allocated() if cuda else _status_kb("VmHWM") * 1024) - base
    timed = times[1:] if len(times) > 1 else times  # first repeat = warm-up when there are several
    sec = sorted(timed)[len(timed) // 2]
    flops = sampler_flops(model.config, args.batch, t2i.text_len, t2i.num_image_tokens, args.timesteps,
                          tok.codebook_size)
    return {"method": args.worker, "seconds": sec, "images_per_s": args.batch / sec, "peak_bytes": int(peak),
            "final": final.cpu().tolist(), "flops": flops, "threads": torch.get_num_threads(),
            "device_name": torch.cuda.get_device_name() if cuda else "cpu"}


PEAK_TFLOPS = {("H100", "bfloat16"): 989.0, ("H100", "float16"): 989.0, ("H100", "float32"): 67.0,
               ("H200", "bfloat16"): 989.0, ("H200", "float32"): 67.0, ("A100", "bfloat16"): 312.0,
               ("A100", "float32"): 19.5}


def peak_tflops(device_name: str, dtype: str, override: float | None) -> float | None:
    """Dense peak of the card (table by name) unless given."""
    if override:
        return override
    for (name, dt), v in PEAK_TFLOPS.items():
        if name in device_name and dt == dtype:
            return v
    return None


def run_method(method: str, args: argparse.Namespace) -> dict:
    """Spawn a fresh interpreter for one method (its own peak memory)."""
    cmd = [sys.executable, "-m", "launch.bench.rollout", "--worker", method, "--batch", str(args.batch),
           "--timesteps", str(args.timesteps), "--repeats", str(args.repeats), "--device", args.device,
           "--dtype", args.dtype, "--seed", str(args.seed)] + (["--real-shapes"] if args.real_shapes else [])
    root = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=root)
    if out.returncode != 0:
        raise RuntimeError(f"bench worker {method} failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    """Parse arguments, run both methods, print a Markdown table."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--real-shapes", action="store_true", help="Show-o 512 shapes (1.4B params, N=1024) with random "
                                                              "weights instead of the tiny config")
    p.add_argument("--batch", type=int, default=None, help="samples per run (default: tiny 4, real 1)")
    p.add_argument("--timesteps", type=int, default=None, help="MaskGIT steps T (default: tiny 50, real 2)")
    p.add_argument("--repeats", type=int, default=None, help="runs per method; the first is a warm-up when > 1 "
                                                             "(default: tiny 4, real 1)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--peak-tflops", type=float, default=None, help="accelerator peak for MFU (default: by name)")
    p.add_argument("--worker", choices=["sampler", "reference"], default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    real = args.real_shapes
    args.batch = args.batch or (1 if real else 4)
    args.timesteps = args.timesteps or (2 if real else 50)
    args.repeats = args.repeats or (1 if real else 4)
    if args.worker:
        print(json.dumps(worker(args)))
        return
    ref = run_method("reference", args)
    fast = run_method("sampler", args)
    same = sum(a == b for ra, rb in zip(ref["final"], fast["final"]) for a, b in zip(ra, rb))
    total = sum(len(r) for r in ref["final"])
    cfg = "real shapes (Show-o 512, random weights)" if real else "tiny"
    mib = 1024 * 1024
    print(f"\nMaskGIT rollout benchmark: {cfg}, device {args.device} ({fast['device_name']}), dtype {args.dtype}, "
          f"batch {args.batch}, T={args.timesteps}, CFG 5, threads {fast['threads']}\n")
    print("| method | s / run | images/s | peak memory (MiB) | speed-up | memory ratio |")
    print("|---|---|---|---|---|---|")
    for r in (ref, fast):
        print(f"| {r['method']} | {r['seconds']:.3f} | {r['images_per_s']:.4f} | {r['peak_bytes'] / mib:.1f} | "
              f"{r['images_per_s'] / ref['images_per_s']:.2f}x | {r['peak_bytes'] / max(ref['peak_bytes'], 1):.2f} |")
    print(f"\nsame final grid tokens: {same}/{total}")
    if args.device.startswith("cuda"):
        peak = peak_tflops(fast["device_name"], args.dtype, args.peak_tflops)
        achieved = fast["flops"] / fast["seconds"] / 1e12
        mfu = f"{100 * achieved / peak:.1f}% of {peak:.0f} TFLOP/s" if peak else "n/a (pass --peak-tflops)"
        print(f"sampler model FLOPs: {fast['flops'] / 1e12:.2f} TFLOP/run, {achieved:.1f} TFLOP/s, MFU {mfu}")


if __name__ == "__main__":
    main()
