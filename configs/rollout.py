"""Rollout actors' configuration: count, resources, group size, answer sampling, shards."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class RolloutConfig:
    """Rollout actors and how they sample."""

    num_workers: int = 3
    """Number of rollout actors (each holds one policy copy)."""
    num_cpus: float = 4.0
    """CPUs reserved per rollout actor."""
    num_gpus: float = 1.0
    """GPUs reserved per rollout actor (0 on CPU-only clusters)."""
    group_size: int = 9
    """G: samples per prompt (paper Table 4: 9). Must be >= 2 (advantages need a group)."""
    answer_max_new_tokens: int = 100
    """Maximum new tokens of the understanding answer IR (Show-o / UniCTokens: 100)."""
    answer_temperature: float = 1.0
    """Sampling temperature of the answer IR (design D3: 1)."""
    answer_top_k: int | None = None
    """Optional top-k for the answer IR; log-probs then use the renormalised top-k distribution (D3)."""
    max_restarts: int = 2
    """A dead rollout actor (SIGKILL, crash, Ray's OOM kill, lost node) is replaced by a fresh one holding the
    learner's current weights, at any phase, this many times per actor slot in one run; its shards are
    re-dispatched (D7 keeps them exact). Counts deaths, not attempts: a replacement that fails while starting is
    retried without counting. One more death stops the run with an error naming the slot and the cause."""
    max_text_len: int = 128
    """Show-o's text block (max_seq_length): 128 tokens + <|t2i|>; the compound prompt's budget (D9)."""
    group_timeout_s: float = 3600.0
    """A dispatched shard (``samples_per_request`` samples of a group) that takes longer than this is treated as
    lost and re-dispatched."""
    samples_per_request: int = 1
    """Samples of a group per dispatched shard: a group's G samples (and their DSOG redraws) are split into shards
    of this many consecutive samples, which idle rollout actors pull from a queue (several groups share it). The
    shards do not depend on num_workers, so by D7 samples are bit-identical for any number of actors; larger
    shards batch more on a GPU, smaller ones balance better. 0 = the whole group in one request."""

    engine: str = "continuous"
    """How a rollout actor runs its shards (actors/rollout/continuous.py). ``continuous``: one running batch of up to
    ``max_batch`` samples, each at its own MaskGIT step; a sample parks at the DSOG screen step while its preview is
    scored in the background, a rejected attempt's redraw joins the batch at once, a kept one resumes in it, and
    finished shards are rewarded in the background: the actor waits on the screen / reward servers only when it
    has nothing to step. ``lockstep``: every shard alone, its attempts of one round as one batch, the actor blocking
    on each screen and on the rewards (the engine before continuous batching). Both group previews, images and
    calls per shard and round; on CPU (one torch thread) they give bit-identical samples and rewards (tested). On a
    GPU the MaskGIT forward's batch shape may change the GEMM kernel, so continuous agrees with lockstep to bf16
    rounding: ``lockstep`` is the deterministic mode for bit-exact comparisons across runs and actor counts."""
    max_batch: int = 16
    """``engine: continuous``: most samples stepping at once in an actor's running batch (2 CFG rows each; a shard's
    round larger than this still runs whole, alone). The driver keeps ceil(max_batch / samples_per_request) + 1
    shards in flight per actor so the batch stays full. 16: the measured knee of Show-o 1.3B's MaskGIT step on
    one H100 is past batch 16 (a memory-bound shape below it, see the README's benchmarks)."""
    max_inflight_calls: int = 4
    """``engine: continuous``: most screen / reward calls an actor has running at once (more wait their turn in the
    actor), each batching the samples that became ready at the same moment."""

    def inflight_shards(self, group_size: int) -> int:
        """Shards the driver keeps in flight per rollout actor: 1 in lock-step, else enough to fill the running
        batch plus one queued (the next sample is ready the moment a row frees)."""
        if self.engine == "lockstep":
            return 1
        shard = group_size if self.samples_per_request == 0 else min(self.samples_per_request, group_size)
        return -(-self.max_batch // shard) + 1

    def validate(self) -> None:
        """Reject impossible values."""
        if self.engine not in ("continuous", "lockstep"):
            raise ValueError(f"rollout.engine must be 'continuous' or 'lockstep', got {self.engine!r}")
        if self.max_batch < 1:
            raise ValueError(f"rollout.max_batch must be >= 1, got {self.max_batch}")
        if self.max_inflight_calls < 1:
            raise ValueError(f"rollout.max_inflight_calls must be >= 1, got {self.max_inflight_calls}")
        if self.group_size < 2:
            raise ValueError(f"rollout.group_size must be >= 2 (got {self.group_size}): GRPO advantages "
                             "compare samples within a group")
        if self.num_workers < 1:
            raise ValueError("rollout.num_workers must be >= 1")
        if self.samples_per_request < 0:
            raise ValueError(f"rollout.samples_per_request must be >= 0 (0 = whole group), "
                             f"got {self.samples_per_request}")
        if self.max_restarts < 0:
            raise ValueError(f"rollout.max_restarts must be >= 0, got {self.max_restarts}")
