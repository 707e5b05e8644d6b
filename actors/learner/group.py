"""Learner group: N Ray actors forming one DeepSpeed data-parallel job (design D1, D4, D5, D11, D12).

Each rank builds the same policy (same config + seed → same init), a frozen reference copy and a DeepSpeed engine
(ZeRO stage from config; bf16 on GPU, fp32 + gloo on CPU; client torch AdamW, so no op JIT builds). The driver deals
the replay units over the ranks (``learner_step.schedule_units``); each rank runs one engine forward + backward per
pack of ``units_per_forward`` units (``scale_wrt_gas=False``; actors/learner/pack.py), marking the last pack as the
accumulation boundary, then one ``engine.step()``.
Unit losses carry a factor world_size because DeepSpeed averages over ranks: the reduced gradient equals the
single-process gradient of the step loss (tested: fp32 ZeRO 0/1/2 exact, bf16 ZeRO-1 to bf16 precision).
Note: ZeRO-2 reduce-scatters in every backward (once per unit), ZeRO-1 only at the boundary.
Every wait on the ranks is bounded (``collective_timeout_s``, also the torch.distributed timeout inside the ranks);
a timeout names the ranks that did not answer.
"""
from __future__ import annotations

import datetime
import logging
import os
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Sequence

import ray

from actors.cluster.deaths import dead_actors, gcs_death
from configs.learner import LearnerConfig, SyncConfig

log = logging.getLogger(__name__)


class LearnerTimeout(TimeoutError):
    """Learner ranks did not finish a call within ``collective_timeout_s``; names the ranks."""


def deepspeed_config(cfg: LearnerConfig, on_gpu: bool) -> dict:
    """The DeepSpeed config dict of one rank."""
    bf16 = cfg.dtype == "bfloat16" or (cfg.dtype == "auto" and on_gpu)
    if bf16 and cfg.zero_stage == 0 and cfg.grad_accum_dtype == "float32":
        raise ValueError("learner.zero_stage=0 with bf16 cannot accumulate gradients in float32 (DeepSpeed); use "
                         "learner.zero_stage>=1 or learner.grad_accum_dtype=bfloat16")
    return {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        # 0 = off; a huge bound instead of 0 so DeepSpeed still measures the norm (ZeRO-0 skips it at 0)
        "gradient_clipping": float(cfg.grad_clip) if cfg.grad_clip > 0 else 1e30,
        "zero_optimization": {"stage": int(cfg.zero_stage), "overlap_comm": False, "contiguous_gradients": True},
        "bf16": {"enabled": bool(bf16)},
        "data_types": {"grad_accum_dtype": "bf16" if (bf16 and cfg.grad_accum_dtype == "bfloat16") else "fp32"},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


class LearnerWorker:
    """One DeepSpeed rank (run as a Ray actor by :class:`LearnerGroup`)."""

    def __init__(self, rank: int, world: int, cfg: Any, backend_factory: Callable | None = None):
        """``cfg``: TrainConfig (``cfg.learner`` is used here; the backend factory reads the rest)."""
        self.rank, self.world, self.cfg = rank, world, cfg
        self.lcfg: LearnerConfig = cfg.learner
        self.backend_factory = backend_factory
        self.engine = None
        self.backend = None
        self._sync = None

    def address(self) -> tuple[str, int]:
        """(node IP, port) for the default group's store; rank 0 binds the port to that IP only (loopback stays
        loopback) and keeps it until :meth:`setup`."""
        from actors.cluster.weight_sync import listen_socket

        ip = ray.util.get_node_ip_address()
        self._listen = listen_socket(ip)
        return ip, self._listen.getsockname()[1]

    def setup(self, master_addr: str, master_port: int) -> dict:
        """Join the DeepSpeed process group, build policy + reference, create the engine."""
        import torch
        import torch.distributed as dist

        from actors.cluster.patches import skip_deepspeed_shm_build
        from actors.cluster.weight_sync import is_loopback, master_store

        t0 = time.perf_counter()
        on_gpu = self.lcfg.num_gpus_per_rank > 0 and torch.cuda.is_available()
        os.environ.update(RANK=str(self.rank), WORLD_SIZE=str(self.world), LOCAL_RANK="0",
                          MASTER_ADDR=master_addr, MASTER_PORT=str(master_port))
        if on_gpu:
            torch.cuda.set_device(0)
        device = torch.device("cuda", 0) if on_gpu else torch.device("cpu")
        import deepspeed

        skip_deepspeed_shm_build()   # no CPU shm op JIT build (actors/cluster/patches.py says why)
        timeout = datetime.timedelta(seconds=self.lcfg.collective_timeout_s)
        backend = "nccl" if on_gpu else "gloo"
        if is_loopback(master_addr) and "lo" in {n for _, n in __import__("socket").if_nameindex()}:
            os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
        if not dist.is_initialized():  # our own store: rank 0 listens on master_addr only
            store = master_store(master_addr, master_port, self.world, self.rank == 0, timeout,
                                 getattr(self, "_listen", None))
            dist.init_process_group(backend, store=store, rank=self.rank, world_size=self.world, timeout=timeout)
        deepspeed.init_distributed(dist_backend=backend, timeout=timeout, verbose=False)
        if self.backend_factory is None:
            from actors.learner.step import make_showo_backend

            self.backend = make_showo_backend(self.cfg, device)
        else:
            self.backend = self.backend_factory(self.cfg, device)
        from actors.learner.step import UnitForward

        module = self.backend.module.to(device)
        self.engine, *_ = deepspeed.initialize(model=UnitForward(module), optimizer=self._optimizer(module),
                                               config=deepspeed_config(self.lcfg, on_gpu))
        self.module = self.engine.module.inner  # the policy (DeepSpeed may have cast it to bf16)
        self._z0_norm = None
        if self.lcfg.zero_stage == 0:  # fp32 ZeRO-0 clips but drops the norm: record it (clip_fp32_gradients)
            from deepspeed.runtime.utils import clip_grad_norm_

            eng = self.engine

            def clip_and_record():
                self._z0_norm = float(clip_grad_norm_(parameters=eng.module.parameters(),
                                                      max_norm=eng.gradient_clipping(), mpu=eng.mpu))

            eng.clip_fp32_gradients = clip_and_record
        if getattr(self.backend, "reference", None) is not None:
            self.backend.reference.to(device=device, dtype=next(self.module.parameters()).dtype)
        return {"rank": self.rank, "setup_s": time.perf_counter() - t0, "device": str(device),
                "params": sum(p.numel() for p in module.parameters() if p.requires_grad)}

    def _optimizer(self, module):
        """Client optimizer: torch AdamW (or SGD); row params get no weight decay under concept_rows."""
        import torch

        c = self.lcfg
        trainable = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        rows = set(getattr(self.backend, "row_params", ()) or ()) if c.trainable == "concept_rows" else set()
        groups = [{"params": [p for n, p in trainable if n not in rows], "weight_decay": c.weight_decay},
                  {"params": [p for n, p in trainable if n in rows], "weight_decay": 0.0}]
        groups = [g for g in groups if g["params"]]
        if c.optimizer == "sgd":
            return torch.optim.SGD(groups, lr=c.lr)
        return torch.optim.AdamW(groups, lr=c.lr, betas=tuple(c.betas), eps=c.eps)

    def train_step(self, samples: Sequence[Any], units: list) -> dict[str, float]:
        """Replay ``units`` (this rank's share), then one optimizer step. Returns stats sums + grad norm + time."""
        from actors.learner.pack import pack_units
        from actors.learner.step import run_units

        t0 = time.perf_counter()
        k = int(self.lcfg.units_per_forward)
        calls = len(pack_units(units, k))
        engine = self.engine
        engine.train()
        if hasattr(self.backend, "begin_step"):
            self.backend.begin_step()
        done = [0]

        def backward(loss):  # the last unit is the accumulation boundary (reduction happens there / in step)
            done[0] += 1
            engine.set_gradient_accumulation_boundary(done[0] == calls)
            engine.backward(loss, scale_wrt_gas=False)

        sums = run_units(self.module, backward, self.backend, samples, units, self.world, forward=engine,
                         units_per_forward=k)
        t1 = time.perf_counter()
        engine.step()
        norm = engine.get_global_grad_norm()
        norm = self._z0_norm if norm is None else norm
        sums.update(grad_norm=float(norm) if norm is not None else float("nan"),
                    replay_s=t1 - t0, step_s=time.perf_counter() - t1)
        return sums

    def state_dict(self) -> dict:
        """The trained module's weights on CPU."""
        return {k: v.detach().cpu().clone() for k, v in self.module.state_dict().items()}

    def save_checkpoint(self, path: str, tag: str = "learner") -> None:
        """DeepSpeed checkpoint (module + optimizer partitions); every rank must call it; shared storage."""
        self.engine.save_checkpoint(path, tag=tag)

    def load_checkpoint(self, path: str, tag: str = "learner") -> None:
        """Load a checkpoint written by :meth:`save_checkpoint` (the service's own files, D15)."""
        load_path, _ = self.engine.load_checkpoint(path, tag=tag)
        if load_path is None:
            raise FileNotFoundError(f"learner checkpoint not found: {path} (tag {tag})")

    def export_final(self, path: str) -> str:
        """Rank 0: write the final weights (backend.export, else model.safetensors)."""
        os.makedirs(path, exist_ok=True)
        if hasattr(self.backend, "export"):
            return self.backend.export(self.module, path)
        from safetensors.torch import save_file

        out = os.path.join(path, "model.safetensors")
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, out)
        return out

    # weight sync, rank 0 side (D11)
    def sync_open(self, world: int, peers: list[str], sync: dict) -> tuple[str, int]:
        """Host the sync store (any free port); returns (host, port) for the rollout actors."""
        from actors.cluster.weight_sync import SyncGroup, resolve_backend

        scfg = SyncConfig(**sync)
        self.sync_close()
        host = scfg.host or ray.util.get_node_ip_address()
        backend = resolve_backend(scfg.backend, self.module)
        self._sync = SyncGroup(host, 0, 0, world, backend, scfg.timeout_s, peers)
        self._sync_cfg = scfg
        return host, self._sync.port

    def sync_join(self) -> float:
        """Form the sync group (blocks until every rollout actor joined, bounded)."""
        return self._sync.join().join_s

    def sync_send(self, version: int = 0) -> dict[str, float]:
        """Broadcast the weights (bucketed; concept rows only under concept_rows)."""
        from actors.cluster.weight_sync import plan_buckets, send_weights

        if self._sync is None or self._sync.pg is None:
            raise RuntimeError("sync_send before a successful sync_open/sync_join")
        b = self.backend
        plan = plan_buckets(self.module, self._sync_cfg.bucket_mb, rows=getattr(b, "row_ids", None),
                            row_params=tuple(getattr(b, "row_params", ()) or ()), version=version)
        return send_weights(self._sync, self.module, plan)

    def sync_close(self) -> None:
        """Leave the sync group."""
        if self._sync is not None:
            self._sync.close()
            self._sync = None


_RemoteWorker = ray.remote(LearnerWorker)


@dataclass
class PendingUpdate:
    """An update running on the learner ranks (:meth:`LearnerGroup.submit_update`)."""

    refs: list
    """One ``train_step`` result per rank."""
    units_per_rank: int
    """Replay units each rank runs (a metric)."""
    started: float
    """``time.perf_counter()`` at submission."""


class LearnerGroup:
    """Driver-side handle of the learner ranks: train_step, checkpoints, weight sync to rollout actors."""

    def __init__(self, cfg: Any, placement: Any = None, num_ranks: int | None = None,
                 backend_factory: Callable | None = None, sync: SyncConfig | None = None):
        """``cfg``: TrainConfig (uses ``learner``, ``sync``, ``objective`` and what the backend factory reads);
        ``placement``: a RolePlacement (``learner_options(rank)``) or None (plain resource requests);
        ``backend_factory(cfg, device)``: the per-rank ReplayBackend (default: Show-o via build_policy)."""
        self.cfg = cfg
        self.lcfg: LearnerConfig = cfg.learner
        self.lcfg.validate()
        self.sync_cfg: SyncConfig = sync or getattr(cfg, "sync", None) or SyncConfig()
        self.num_ranks = int(num_ranks or self.lcfg.num_ranks)
        self.alpha_und = float(cfg.objective.alpha_und) if hasattr(cfg, "objective") else 0.0
        self._sync_ids: list | None = None
        self._version = 0
        self.last_sync: dict[str, float] = {}
        self.workers = []
        for rank in range(self.num_ranks):
            if placement is not None:
                opts = placement.learner_options(rank)
            else:
                opts = {"num_cpus": self.lcfg.num_cpus_per_rank, "num_gpus": self.lcfg.num_gpus_per_rank}
            self.workers.append(_RemoteWorker.options(**opts).remote(rank, self.num_ranks, cfg, backend_factory))
        try:
            addr, port = self._get([self.workers[0].address.remote()], "address")[0]
            self.setup_info = self._get([w.setup.remote(addr, port) for w in self.workers], "setup")
        except BaseException:   # a rank that died while starting: give back every rank (and its bundle) first
            self.shutdown()
            raise
        log.info("learner group ready: %d ranks, %s", self.num_ranks, self.setup_info[0])

    def _get(self, refs: list, what: str, timeout: float | None = None, who: str = "learner ranks") -> list:
        """ray.get bounded by ``timeout`` (default collective_timeout_s + 30 s); a timeout names the callees that
        did not finish (LearnerTimeout for ranks, WeightSyncTimeout for rollout actors)."""
        from actors.cluster.weight_sync import WeightSyncTimeout

        timeout = timeout if timeout is not None else self.lcfg.collective_timeout_s + 30.0
        try:
            return ray.get(refs, timeout=timeout)
        except ray.exceptions.GetTimeoutError:
            done, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
            pending = [i for i, r in enumerate(refs) if r not in done]
            exc = LearnerTimeout if who == "learner ranks" else WeightSyncTimeout
            raise exc(f"{what}: {who} {pending} did not finish within {timeout:.0f}s") from None

    def train_step(self, samples: Sequence[Any]) -> dict[str, float]:
        """One GRPO update on ``samples`` (advantages filled; consumed in id order, D7). Returns metrics:
        loss, kl, clip_frac, grad_norm, logp_mismatch_image/answer, units, time_s."""
        return self.collect_update(self.submit_update(samples))

    def submit_update(self, samples: Sequence[Any]) -> "PendingUpdate":
        """Start :meth:`train_step`'s update on every rank and return at once (``run.overlap``: the driver dispatches
        the next rollout meanwhile); :meth:`collect_update` waits for it. Bad samples are refused here, before any
        rank starts."""
        from actors.learner.step import schedule_units
        from rl.grpo.batch import sort_samples, validate_batch

        if not samples:
            raise ValueError("LearnerGroup.train_step: empty sample list")
        t0 = time.perf_counter()
        samples = sort_samples(validate_batch(samples))  # clear errors here, not inside a collective; D7 order
        plan = schedule_units(samples, self.num_ranks, self.alpha_und)
        ref = ray.put(list(samples))
        return PendingUpdate([w.train_step.remote(ref, plan[r]) for r, w in enumerate(self.workers)],
                             units_per_rank=len(plan[0]), started=t0)

    def collect_update(self, pending: "PendingUpdate") -> dict[str, float]:
        """Wait for a submitted update (bounded like every learner call) and return its metrics."""
        from actors.learner.step import summarize

        outs = self._get(pending.refs, "train_step")
        sums = {k: sum(o[k] for o in outs) for k in outs[0] if k not in ("grad_norm", "replay_s", "step_s")}
        metrics = summarize(sums)
        metrics.update(grad_norm=outs[0]["grad_norm"], units_per_rank=float(pending.units_per_rank),
                       replay_s=max(o["replay_s"] for o in outs), optim_s=max(o["step_s"] for o in outs),
                       time_s=time.perf_counter() - pending.started)
        self._version += 1
        return metrics

    def state_dict_rank0(self) -> dict:
        """Rank 0's module weights on CPU (all ranks hold the same under ZeRO ≤ 2)."""
        return self._get([self.workers[0].state_dict.remote()], "state_dict")[0]

    def state_dict_ref(self):
        """Object ref of rank 0's weights: they go rank 0 → object store → whoever is given the ref, not through the
        driver (a replacement rollout actor's ``load_weights``)."""
        return self.workers[0].state_dict.remote()

    def dead_ranks(self, settle_s: float = 0.0) -> list[int]:
        """Ranks whose actor the GCS reports DEAD (polling up to ``settle_s`` for a death to show)."""
        return dead_actors(self.workers, settle_s=settle_s)

    def death_of(self, rank: int):
        """The cause the GCS recorded for dead rank ``rank`` (a :class:`actors.cluster.deaths.Death`) or None."""
        return gcs_death(self.workers[rank])

    def state_dicts(self) -> list[dict]:
        """Every rank's module weights (tests: ranks must agree bit for bit)."""
        return self._get([w.state_dict.remote() for w in self.workers], "state_dict")

    def save_checkpoint(self, path: str) -> None:
        """DeepSpeed checkpoint of every rank into ``path`` (shared storage on multi-node)."""
        self._get([w.save_checkpoint.remote(str(path)) for w in self.workers], "save_checkpoint")

    def load_checkpoint(self, path: str) -> None:
        """Load a checkpoint written by :meth:`save_checkpoint`."""
        self._get([w.load_checkpoint.remote(str(path)) for w in self.workers], "load_checkpoint")

    def export_final(self, path: str) -> str:
        """Final weights from rank 0 (see LearnerWorker.export_final)."""
        return self._get([self.workers[0].export_final.remote(str(path))], "export_final")[0]

    # -- weight sync (D11) ---------------------------------------------------------------------------------
    def connect_rollouts(self, actors: Sequence[Any]) -> None:
        """(Re)form the sync group: learner rank 0 + ``actors`` (each must have ``init_weight_sync(addr, port,
        rank, world)``). Raises WeightSyncTimeout naming the actors that never joined."""
        sc = self.sync_cfg
        world = 1 + len(actors)
        peers = ["learner rank 0"] + [f"rollout actor {i}" for i in range(len(actors))]
        self._sync_ids = None
        host, port = self._get([self.workers[0].sync_open.remote(world, peers, asdict(sc))], "sync_open")[0]
        joins = [a.init_weight_sync.remote(host, port, i + 1, world) for i, a in enumerate(actors)]
        self._get([self.workers[0].sync_join.remote()], "weight sync join", sc.timeout_s + 30.0)
        self._get(joins, "weight sync init_weight_sync", sc.timeout_s + 30.0, who="rollout actors")
        self._sync_ids = [a._actor_id.hex() for a in actors]

    def sync_weights(self, actors: Sequence[Any]) -> float:
        """Broadcast rank 0's weights to ``actors`` (each needs ``receive_weights()``); connects first when the
        actor set changed. Returns the sender's seconds; details in ``self.last_sync``."""
        if self._sync_ids != [a._actor_id.hex() for a in actors]:
            self.connect_rollouts(actors)
        sc = self.sync_cfg
        t0 = time.perf_counter()
        send = self.workers[0].sync_send.remote(self._version)
        recvs = [a.receive_weights.remote() for a in actors]
        try:
            stats = self._get([send], "weight sync send", self.lcfg.collective_timeout_s + 2 * sc.timeout_s + 60)[0]
            self._get(recvs, "weight sync receive_weights", sc.timeout_s + 30.0, who="rollout actors")
        except Exception:
            self._sync_ids = None  # the group is broken: re-form it next time
            raise
        self.last_sync = dict(stats, sync_wall_s=time.perf_counter() - t0)
        return float(stats["sync_s"])

    def shutdown(self) -> None:
        """Kill the learner actors."""
        for w in self.workers:
            try:
                ray.kill(w)
            except Exception:
                pass
        self.workers = []
