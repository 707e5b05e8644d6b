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

    def validate(self) -> None:
        """Reject impossible values."""
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
