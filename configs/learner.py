"""Learner group configuration (DeepSpeed ranks, optimizer, replay packing)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class LearnerConfig:
    """Learner group: ranks, DeepSpeed, optimizer (paper: AdamW lr 1e-6, betas (0.9, 0.999), wd 1e-3, eps 1e-8)."""

    num_ranks: int = 4
    """DeepSpeed data-parallel ranks (one Ray actor each)."""
    zero_stage: int = 2
    """DeepSpeed ZeRO stage 0, 1 or 2 (3 is not supported by the weight sync)."""
    dtype: str = "auto"
    """Training dtype: auto (bf16 on GPU, fp32 on CPU), bfloat16 or float32; fp16 is not supported."""
    lr: float = 1e-6
    """AdamW learning rate (constant)."""
    weight_decay: float = 1e-3
    """AdamW weight decay (0 for the row parameters under trainable="concept_rows", so frozen rows stay exact)."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""
    eps: float = 1e-8
    """AdamW epsilon."""
    grad_accum_dtype: str = "float32"
    """Dtype the step's gradients accumulate in over its many units when training in bf16 (float32 | bfloat16)."""
    grad_clip: float = 1.0
    """Global gradient-norm clip (0 = off; the norm is still measured and reported)."""
    trainable: str = "all"
    """D1: "all" Show-o weights, or "concept_rows" (only the concept tokens' embedding / lm_head rows)."""
    optimizer: str = "adamw"
    """adamw (torch AdamW) or sgd (plain SGD, no momentum: tests read the reduced gradient as the update)."""
    collective_timeout_s: float = 600.0
    """Bound on every collective inside the ranks and on every driver-side wait for them."""
    num_cpus_per_rank: float = 4.0
    """CPUs reserved per learner rank."""
    num_gpus_per_rank: float = 1.0
    """GPUs reserved per learner rank (0 on CPU-only clusters)."""
    units_per_forward: int = 4
    """Image replay units (MaskGIT steps of a sample, or one step of several samples) batched into one forward +
    backward; the gradient equals the unit-by-unit one (up to float rounding), activation memory grows ~k-fold.
    Default by measurement (launch/bench/step.py --scaling): replay tokens/s rose with k up to 8 on the tiny CPU
    model (README benchmarks); 4 keeps real-shape activations near 4 × 3.8 GiB (bf16, the meta-device estimate),
    which fits an 80 GiB learner GPU next to ZeRO-2 state and the reference copy. 1 = one unit per forward."""

    @classmethod
    def tiny(cls) -> "LearnerConfig":
        """CPU test values: 2 ranks, 1 CPU each, no GPU, short timeouts."""
        return cls(num_ranks=2, collective_timeout_s=120.0, num_cpus_per_rank=1.0, num_gpus_per_rank=0.0)

    def validate(self) -> None:
        """Reject impossible values (messages name the field)."""
        if self.num_ranks < 1:
            raise ValueError(f"learner.num_ranks must be >= 1, got {self.num_ranks}")
        if self.zero_stage not in (0, 1, 2):
            raise ValueError(f"learner.zero_stage must be 0, 1 or 2 (weight sync needs full params), "
                             f"got {self.zero_stage}")
        if self.dtype not in ("auto", "bfloat16", "float32"):
            raise ValueError(f"learner.dtype must be auto|bfloat16|float32, got {self.dtype!r}")
        if self.trainable not in ("all", "concept_rows"):
            raise ValueError(f"learner.trainable must be 'all' or 'concept_rows', got {self.trainable!r}")
        if self.units_per_forward < 1:
            raise ValueError(f"learner.units_per_forward must be >= 1, got {self.units_per_forward}")
        if self.optimizer not in ("adamw", "sgd"):
            raise ValueError(f"learner.optimizer must be 'adamw' or 'sgd', got {self.optimizer!r}")


@dataclass
class SyncConfig:
    """Learner → rollout weight sync (D11)."""

    bucket_mb: float = 256.0
    """Target size of one flat broadcast bucket in MiB (a larger tensor travels alone in its own bucket)."""
    backend: str = "auto"
    """Process-group backend: gloo, nccl, or auto (NCCL when the model is on CUDA, else gloo)."""
    timeout_s: float = 300.0
    """Bound on every blocking step (rendezvous, header, each bucket); past it → WeightSyncTimeout."""
    host: str | None = None
    """Address of the store on learner rank 0; None = that actor's Ray node IP."""

    @classmethod
    def tiny(cls) -> "SyncConfig":
        """CPU test values: small buckets (so tests see several), short timeout."""
        return cls(bucket_mb=0.05, backend="gloo", timeout_s=20.0)
