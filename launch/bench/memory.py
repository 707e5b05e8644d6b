"""Learner-memory measurements for launch/bench/step: peak memory helpers, bytes saved for backward, the keep-k-graphs
baseline against per-step backward accumulation, and a meta-device estimate at real Show-o shapes."""
from __future__ import annotations

import contextlib
import ctypes
import gc
import os
from dataclasses import replace

import numpy as np

MIB = float(1 << 20)
KS = (1, 2, 4)
KEEP, PER_STEP = "keep k graphs, one backward", "per-step backward (run_units)"


# ----------------------------------------------------------------------------------------------- memory helpers
def proc_kb(pid: int, key: str) -> int:
    """A ``/proc/<pid>/status`` field in kB (VmRSS, VmHWM); 0 when unreadable."""
    with contextlib.suppress(OSError), open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1])
    return 0


def reset_peak_rss(pid: int) -> None:
    """Reset a process's VmHWM to its current RSS (Linux ``clear_refs``)."""
    with contextlib.suppress(OSError), open(f"/proc/{pid}/clear_refs", "w") as f:
        f.write("5")


@contextlib.contextmanager
def peak_memory(device: str = "cpu"):
    """Yields a dict whose "bytes" is, on exit, the peak above the level at entry (CUDA allocated / RSS)."""
    import torch

    out, cuda = {"bytes": 0}, str(device).startswith("cuda")
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)   # freed heap back to the OS, so RSS sees new allocations
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = proc_kb(os.getpid(), "VmRSS") * 1024
        reset_peak_rss(os.getpid())
    yield out
    if cuda:
        torch.cuda.synchronize()
    out["bytes"] = (torch.cuda.max_memory_allocated() if cuda else proc_kb(os.getpid(), "VmHWM") * 1024) - base


class SavedBytes:
    """While active, counts the distinct storages autograd saves for backward (parameters excluded).
    ``take()`` returns the bytes counted since the last take."""

    def __init__(self, *modules):
        self.exclude = {p.untyped_storage()._cdata for m in modules for p in m.parameters()}
        self.seen: dict[int, int] = {}

    def _pack(self, t):
        st = t.untyped_storage()
        if st._cdata not in self.exclude:
            self.seen[st._cdata] = st.nbytes()
        return t

    def take(self) -> int:
        """Bytes counted so far; starts a new count."""
        n, self.seen = sum(self.seen.values()), {}
        return n

    def __enter__(self) -> "SavedBytes":
        import torch

        self._ctx = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._ctx.__exit__(*exc)



def learner_memory(ip, ks=KS) -> list[dict]:
    """(c) per k: keep k steps' graphs (sum the unit losses, one backward) vs per-step backward (run_units)."""
    from actors.learner.step import ReplayUnit, ShowoBackend, run_units

    cfg = ip.cfg
    backend = ShowoBackend(ip.policy, cfg.objective, cfg.sampler.guidance_scale, trainable=cfg.learner.trainable,
                           answer_temperature=cfg.rollout.answer_temperature, answer_top_k=cfg.rollout.answer_top_k)
    module, samples = backend.module.train(), ip.samples
    counter = SavedBytes(module, *([backend.reference] if backend.reference is not None else []))
    units = [ReplayUnit(0, "image", t) for t in range(int(samples[0].states.shape[0]))]

    def per_step(k):
        alive = []
        run_units(module, lambda loss: (alive.append(counter.take()), loss.backward()), backend, samples,
                  units[:k], 1)
        return max(alive)

    def keep(k):
        total = sum(backend.unit_loss(module, samples, u, len(samples))[0] for u in units[:k])
        saved = counter.take()
        total.backward()
        return saved

    def zero_grads():
        for p in module.parameters():
            if p.grad is not None:
                p.grad.zero_()

    backend.begin_step()
    rows = []
    with counter:
        per_step(1)   # warm-up: allocates the .grad buffers (kept, zeroed) and the T2I cache
        for mode, fn in ((KEEP, keep), (PER_STEP, per_step)):
            for k in (k for k in ks if k <= len(units)):
                zero_grads()
                counter.take()
                with peak_memory(ip.device) as pm:
                    saved = fn(k)
                rows.append({"mode": mode, "k": k, "peak_mib": pm["bytes"] / MIB, "saved_mib": saved / MIB})
    zero_grads()
    return rows


def fit(rows: list[dict], mode: str, key: str = "peak_mib") -> tuple[float, float]:
    """Least-squares (MiB per kept step, intercept) of ``key`` against k for one mode."""
    pts = np.array([(r["k"], r[key]) for r in rows if r["mode"] == mode], dtype=float)
    if len(pts) < 2:
        return float("nan"), float("nan")
    slope, icpt = np.polyfit(pts[:, 0], pts[:, 1], 1)
    return float(slope), float(icpt)


@contextlib.contextmanager
def fused_attention_on_meta():
    """backbone.phi's SDPA on meta tensors -> the fused (flash) kernel, which saves q, k, v, out, logsumexp and
    the mask as the CPU / CUDA fused kernels do, instead of meta's math fallback (full attention matrices)."""
    import torch

    import backbone.phi as phi

    real = phi.F

    class _F:
        def __getattr__(self, name):
            return getattr(real, name)

        @staticmethod
        def scaled_dot_product_attention(q, k, v, attn_mask=None, **kw):
            if q.device.type != "meta":
                return real.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, **kw)
            if attn_mask is not None and attn_mask.dtype == torch.bool:
                attn_mask = torch.zeros(attn_mask.shape, dtype=q.dtype, device="meta").masked_fill(
                    ~attn_mask, float("-inf"))
            return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, attn_mask=attn_mask)[0]

    phi.F = _F()
    try:
        yield
    finally:
        phi.F = real


def meta_saved_per_step(phi_config, tok, t2i, dtype: str, guidance: float, objective) -> int:
    """Bytes one replayed MaskGIT step (image_step_logprobs + image_step_loss, sample 0 of ``t2i``) saves for
    backward, on the meta device."""
    import torch

    from backbone.maskgit import make_t2i_batch
    from backbone.phi import ShowoPhi
    from backbone.replay import image_step_logprobs
    from rl.grpo.objective import image_step_loss

    with torch.device("meta"):
        model = ShowoPhi(phi_config).to(getattr(torch, dtype)).train()
    t2i = replace(t2i, input_ids=t2i.input_ids[:1], uncond_input_ids=t2i.uncond_input_ids[:1])
    batch = make_t2i_batch(tok, t2i, guidance)
    batch = replace(batch, ids=batch.ids.to("meta"), mask=batch.mask.to("meta"))
    n = t2i.num_image_tokens
    state = torch.full((1, n), tok.mask_id, device="meta")
    with fused_attention_on_meta(), SavedBytes(model) as counter:
        logp = image_step_logprobs(model, tok, batch, state, torch.zeros_like(state), guidance)
        image_step_loss(logp, None, logp.detach(), [1.0], 50, n, 1, objective)
    return counter.take()


def real_shape_saved_per_step(dtype: str, guidance: float, objective) -> int:
    """:func:`meta_saved_per_step` at Show-o 512 shapes (phi-1.5, vocab 58498, 129 text + 1026 block tokens)."""
    from backbone.phi import ShowoPhiConfig
    from launch.bench.rollout import RealShapeIds, real_shape_t2i

    tok = RealShapeIds()
    return meta_saved_per_step(ShowoPhiConfig.real(vocab_size=tok.vocab_size), tok, real_shape_t2i(tok, 1),
                               dtype, guidance, objective)
