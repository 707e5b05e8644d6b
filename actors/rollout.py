"""Rollout actors: each holds an inference copy of the policy and turns group requests into scored samples."""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import ray

log = logging.getLogger(__name__)


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
    re-dispatched (D7 keeps them exact). One more death stops the run with an error naming the slot."""
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


def _device(num_gpus: float) -> str:
    import torch

    return "cuda" if num_gpus > 0 and torch.cuda.is_available() else "cpu"


@ray.remote(max_restarts=0)   # replaced by the controller instead (actors/recovery.py): a restart would lose weights
class RolloutWorker:
    """A Ray actor producing GRPO groups; receives weights from learner rank 0 (design D11)."""

    def __init__(self, cfg_dict: dict, worker_index: int):
        from actors.rollout_engine import RolloutEngine
        from actors.scoring import serve_scorer
        from actors.weight_sync import WeightReceiver
        from actors.learner_step import concept_specs
        from backbone.build import build_policy
        from configs.schema import config_from_dict
        from rl.data import load_dataset

        import torch

        torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
        self.cfg = config_from_dict(cfg_dict)
        self.index = worker_index
        self.device = _device(self.cfg.rollout.num_gpus)
        self.dataset = load_dataset(self.cfg.data)
        self.policy = build_policy(self.cfg.model, concept_specs(self.dataset), device=self.device)
        self.policy.model.eval()
        self.engine = RolloutEngine(self.cfg, self.policy, self.dataset, serve_scorer(self.cfg),
                                    device=self.device)
        self.receiver = WeightReceiver(self.cfg.sync)

    def ready(self) -> int:
        """Returns the worker index once the policy is built."""
        return self.index

    def generate_group(self, request):
        """Produce one group (see :meth:`RolloutEngine.generate_group`)."""
        return self.engine.generate_group(request)

    def generate_samples(self, request):
        """Produce one shard of a group (see :meth:`RolloutEngine.generate_samples`)."""
        return self.engine.generate_samples(request)

    def evaluate(self, step: int) -> dict:
        """Held-out UnifyBench++ evaluation of the current weights (flat ``eval/*`` metrics)."""
        from rl.evaluate import worker_evaluate

        return worker_evaluate(self, step)

    def init_weight_sync(self, address: str, port: int, rank: int, world_size: int) -> None:
        """Join the learner→rollout broadcast group."""
        self.receiver.init_group(address, port, rank, world_size)

    def receive_weights(self) -> float:
        """Receive the learner's weights (blocks until rank 0 broadcasts); returns seconds spent."""
        return self.receiver.receive(self.policy.model)

    def load_weights(self, params: dict) -> None:
        """Copy the learner's parameters (name → tensor, as learner rank 0's ``state_dict``) into the policy: how a
        replacement actor gets the current weights without re-forming the sync group (actors/recovery.py)."""
        import torch

        own = dict(self.policy.model.named_parameters())
        missing = sorted(set(own) - set(params))
        if missing:
            raise ValueError(f"load_weights: parameters missing from the learner's weights: {missing[:5]}")
        with torch.no_grad():
            for name, p in own.items():
                p.data.copy_(params[name].to(device=p.device, dtype=p.dtype))

    def state_dict(self) -> dict:
        """The policy's weights on CPU (for tests)."""
        return {k: v.detach().cpu() for k, v in self.policy.model.state_dict().items()}
