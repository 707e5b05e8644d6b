"""Rollout actors: each holds an inference copy of the policy and turns group requests into scored samples."""
from __future__ import annotations

import logging
import os

import ray

log = logging.getLogger(__name__)


def actor_options(cfg) -> dict:
    """Options every rollout actor is created with besides its placement: the continuous engine serves several
    shard calls at once (they share one running batch), plus room for control calls (ready, weights) beside them."""
    if cfg.rollout.engine == "lockstep":
        return {}
    return {"max_concurrency": cfg.rollout.inflight_shards(cfg.rollout.group_size) + 4}


def _device(num_gpus: float) -> str:
    import torch

    return "cuda" if num_gpus > 0 and torch.cuda.is_available() else "cpu"


@ray.remote(max_restarts=0)   # replaced by the controller instead (actors/rollout/pool.py): a restart would lose weights
class RolloutWorker:
    """A Ray actor producing GRPO groups; receives weights from learner rank 0 (design D11)."""

    def __init__(self, cfg_dict: dict, worker_index: int, dataset=None):
        """``dataset``: the ConceptDataset the driver read and checked (passed as an object ref, resolved by Ray);
        None = read ``cfg.data`` here (benchmarks and tests that start rollout actors on their own)."""
        import torch

        from actors.cluster.weight_sync import WeightReceiver
        from actors.learner.step import concept_specs
        from actors.rollout.engine import RolloutEngine
        from actors.rollout.scoring import serve_scorer
        from backbone.build import build_policy
        from configs.schema import config_from_dict
        from rl.data.reader import load_dataset

        torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
        self.cfg = config_from_dict(cfg_dict)
        self.index = worker_index
        self.device = _device(self.cfg.rollout.num_gpus)
        self.dataset = dataset if dataset is not None else load_dataset(self.cfg.data)
        self.policy = build_policy(self.cfg.model, concept_specs(self.dataset), device=self.device)
        self.policy.model.eval()
        self.engine = RolloutEngine(self.cfg, self.policy, self.dataset, serve_scorer(self.cfg),
                                    device=self.device)
        self.receiver = WeightReceiver(self.cfg.sync)
        self.continuous = None
        if self.cfg.rollout.engine == "continuous":
            from actors.rollout.continuous import ContinuousEngine

            self.continuous = ContinuousEngine(self.engine, self.cfg.rollout.max_batch,
                                               self.cfg.rollout.max_inflight_calls)

    def ready(self) -> int:
        """Returns the worker index once the policy is built."""
        return self.index

    def generate_group(self, request):
        """Produce one group (see :meth:`RolloutEngine.generate_group`)."""
        return self.engine.generate_group(request)

    def generate_samples(self, request):
        """Produce one shard of a group: through the running batch (``rollout.engine: continuous``, several calls at
        once) or alone, lock-step (:meth:`RolloutEngine.generate_samples`)."""
        if self.continuous is not None:
            return self.continuous.generate_samples(request)
        return self.engine.generate_samples(request)

    def evaluate(self, step: int) -> dict:
        """Held-out UnifyBench++ evaluation of the current weights (flat ``eval/*`` metrics)."""
        from rl.eval.evaluate import worker_evaluate

        return worker_evaluate(self, step)

    def init_weight_sync(self, address: str, port: int, rank: int, world_size: int) -> None:
        """Join the learner→rollout broadcast group."""
        self.receiver.init_group(address, port, rank, world_size)

    def receive_weights(self) -> float:
        """Receive the learner's weights (blocks until rank 0 broadcasts); returns seconds spent."""
        return self.receiver.receive(self.policy.model)

    def load_weights(self, params: dict) -> None:
        """Copy the learner's parameters (name → tensor, as learner rank 0's ``state_dict``) into the policy: how a
        replacement actor gets the current weights without re-forming the sync group (actors/rollout/pool.py)."""
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
