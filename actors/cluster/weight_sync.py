"""Weight sync learner rank 0 → rollout actors (design D11).

One path on every machine: a *standalone* torch.distributed process group (its own ``TCPStore``; the learners'
default group stays DeepSpeed's) joining learner rank 0 (group rank 0, the store's master) and every rollout actor
(ranks 1..W-1). The sender flattens the parameters into dtype-grouped buckets of about ``bucket_mb`` and broadcasts
them; each receiver copies the buckets back into its own module. Gloo on CPU, NCCL on GPU.

Protocol of one ``send``/``receive`` (all members take part, in this order):
1. header: length (int64 [1]) then the pickled :class:`SyncPlan` (uint8) – names, shapes, dtypes, rows per bucket;
2. every receiver checks the plan against its module; an int32 ``all_reduce(MIN)`` of the verdicts lets every
   member stop with a clear error (no one waits on a half-finished broadcast);
3. one broadcast per bucket.

Every blocking call is bounded by ``SyncConfig.timeout_s``; a peer that never joins or stops answering ends in
:class:`WeightSyncTimeout` naming the peers, never a hang. With ``rows`` set (D1 ``concept_rows``) only those rows
of the row parameters (embedding / ``lm_head``) travel.

Under ZeRO-2 (and 0/1) every learner rank holds the full parameters, so rank 0 sends its module as is. ZeRO-3 is
not implemented: the sender would have to gather each bucket's parameters with
``deepspeed.zero.GatheredParameters(params, modifier_rank=None)`` on *all* learner ranks before rank 0 broadcasts.
"""
from __future__ import annotations

import datetime
import logging
import os
import pickle
import socket
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from configs.learner import SyncConfig

log = logging.getLogger(__name__)

_DTYPES = {str(d): d for d in (torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64,
                               torch.int32, torch.uint8, torch.bool)}


class WeightSyncError(RuntimeError):
    """The sync group could not be used (plan mismatch, bad state); the message names the peer and tensor."""


class WeightSyncTimeout(WeightSyncError):
    """A rendezvous or broadcast did not complete within ``SyncConfig.timeout_s``; names the peers involved."""


@dataclass
class TensorSpec:
    """One tensor (or its row subset) inside a bucket."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    rows: tuple[int, ...] | None = None

    @property
    def numel(self) -> int:
        """Elements this entry contributes to its bucket."""
        n = 1
        for s in self.shape:
            n *= s
        return n


@dataclass
class SyncPlan:
    """Layout of one sync: buckets (each one dtype) of tensor specs, in broadcast order."""

    buckets: list[list[TensorSpec]] = field(default_factory=list)
    version: int = 0

    @property
    def num_bytes(self) -> int:
        """Payload bytes (all buckets)."""
        return sum(s.numel * _DTYPES[s.dtype].itemsize for b in self.buckets for s in b)


def plan_buckets(model: nn.Module, bucket_mb: float, rows: list[int] | None = None,
                 row_params: tuple[str, ...] = (), only: tuple[str, ...] | None = None, version: int = 0) -> SyncPlan:
    """Group ``model``'s parameters by dtype into buckets of about ``bucket_mb`` MiB (named_parameters order).

    ``only``: restrict to these parameter names. ``rows`` + ``row_params``: for those names send only ``rows``
    (dim 0). With ``rows`` set and ``only`` None, only ``row_params`` travel (the D1 ``concept_rows`` case).
    """
    cap = max(1, int(bucket_mb * 2**20))
    params = dict(model.named_parameters())
    if rows is not None and only is None:
        only = tuple(row_params)
    names = [n for n in params if only is None or n in only]
    missing = [n for n in (only or ()) if n not in params]
    if missing:
        raise ValueError(f"plan_buckets: parameters {missing} not in the model")
    by_dtype: dict[str, list[TensorSpec]] = {}
    for name in names:
        p = params[name]
        r = tuple(int(i) for i in rows) if (rows is not None and name in row_params) else None
        shape = ((len(r),) + tuple(p.shape[1:])) if r is not None else tuple(p.shape)
        by_dtype.setdefault(str(p.dtype), []).append(TensorSpec(name, shape, str(p.dtype), r))
    plan = SyncPlan(version=version)
    for dtype, specs in by_dtype.items():
        bucket: list[TensorSpec] = []
        size = 0
        item = _DTYPES[dtype].itemsize
        for spec in specs:
            nbytes = spec.numel * item
            if bucket and size + nbytes > cap:
                plan.buckets.append(bucket)
                bucket, size = [], 0
            bucket.append(spec)
            size += nbytes
        if bucket:
            plan.buckets.append(bucket)
    return plan


def check_plan(model: nn.Module, plan: SyncPlan) -> str | None:
    """Return None when every spec fits ``model``, else a message naming the first bad tensor.

    Dtypes may differ (e.g. bf16 learner → fp32 receiver): values are cast on copy."""
    params = dict(model.named_parameters())
    for bucket in plan.buckets:
        for s in bucket:
            p = params.get(s.name)
            if p is None:
                return f"parameter {s.name!r} missing in the receiver's model"
            want = ((len(s.rows),) + tuple(p.shape[1:])) if s.rows is not None else tuple(p.shape)
            if want != tuple(s.shape):
                return f"parameter {s.name!r}: sender shape {s.shape}, receiver {tuple(p.shape)}"
            if s.rows is not None and s.rows and max(s.rows) >= p.shape[0]:
                return f"parameter {s.name!r}: row {max(s.rows)} out of range {p.shape[0]}"
    return None


def listen_socket(host: str) -> socket.socket:
    """A listening TCP socket bound to ``host`` only, on a free port (keeps a loopback cluster on loopback:
    ``TCPStore`` alone would listen on every interface). Pass ``.fileno()`` as ``master_listen_fd``."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, 0))
    sock.listen(128)
    return sock


def is_loopback(host: str) -> bool:
    """``host`` is a loopback address (the whole job runs on this machine)."""
    return host.startswith("127.") or host in ("localhost", "::1")


def master_store(host: str, port: int, world: int, is_master: bool, timeout: datetime.timedelta,
                 listen: socket.socket | None = None) -> dist.TCPStore:
    """TCPStore; the master listens on ``listen`` (bound to one address) when given."""
    kw = {"master_listen_fd": listen.fileno()} if (is_master and listen is not None) else {}
    return dist.TCPStore(host, port, world, is_master, timeout, wait_for_workers=False, **kw)


def gloo_group(store, rank: int, world: int, timeout: datetime.timedelta, host: str) -> dist.ProcessGroupGloo:
    """ProcessGroupGloo whose sockets bind to loopback when the job is on loopback (else the default device)."""
    opts = dist.ProcessGroupGloo._Options()
    opts._timeout = timeout
    dev = (dist.ProcessGroupGloo.create_device(hostname="127.0.0.1") if is_loopback(host)
           else dist.ProcessGroupGloo.create_default_device())
    opts._devices = [dev]
    return dist.ProcessGroupGloo(store, rank, world, opts)


class SyncGroup:
    """A standalone process group (own TCPStore) with timed collectives. Rank 0 hosts the store."""

    def __init__(self, host: str, port: int, rank: int, world: int, backend: str = "gloo",
                 timeout_s: float = 300.0, peers: list[str] | None = None, prefix: str = "weight_sync"):
        """Open the store: rank 0 hosts it (``port`` 0 = any free port, see ``self.port``), others connect.

        Call :meth:`join` next (all members concurrently) to form the process group.
        """
        self.rank, self.world, self.backend, self.prefix = rank, world, backend, prefix
        self.timeout = datetime.timedelta(seconds=timeout_s)
        self.timeout_s = timeout_s
        self.peers = list(peers) if peers else [f"rank {i}" for i in range(world)]
        self.host = host
        self.pg = None
        self.join_s = 0.0
        self.device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
        self._listen = listen_socket(host) if (rank == 0 and port == 0) else None
        if self._listen is not None:
            port = self._listen.getsockname()[1]
        try:
            self.store = master_store(host, port, world, rank == 0, self.timeout, self._listen)
        except Exception as e:  # a client could not reach the master in time
            raise WeightSyncTimeout(f"weight sync rank {rank}: no store at {host}:{port} within {timeout_s}s "
                                    f"(learner rank 0 not listening): {e}") from e
        self.port = port

    def join(self) -> "SyncGroup":
        """Form the process group; blocks until every member joined, else WeightSyncTimeout naming the missing."""
        t0 = time.perf_counter()
        self.store.set(f"{self.prefix}/joined/{self.rank}", self._name(self.rank))
        pstore = dist.PrefixStore(self.prefix, self.store)
        try:
            if self.backend == "nccl":
                os.environ.setdefault("NCCL_CUMEM_ENABLE", "0")  # OpenRLHF/verl: avoids cross-process hangs
                opts = dist.ProcessGroupNCCL.Options()
                opts._timeout = self.timeout
                self.pg = dist.ProcessGroupNCCL(pstore, self.rank, self.world, opts)
            else:
                self.pg = gloo_group(pstore, self.rank, self.world, self.timeout, self.host)
        except Exception as e:
            raise WeightSyncTimeout(f"weight sync rendezvous on {self.host}:{self.port} (rank {self.rank}) timed "
                                    f"out after {self.timeout_s}s; peers that never joined: {self._missing()}") from e
        self.join_s = time.perf_counter() - t0
        return self

    def _name(self, i: int) -> str:
        """Display name of group rank ``i``."""
        return self.peers[i] if i < len(self.peers) else f"rank {i}"

    def _missing(self) -> list[str]:
        """Names of the ranks that did not register in the store."""
        out = []
        for i in range(self.world):
            try:
                if not self.store.check([f"{self.prefix}/joined/{i}"]):
                    out.append(self._name(i))
            except Exception:
                out.append(f"{self._name(i)} (store unreachable)")
        return out

    def _wait(self, work, what: str) -> None:
        """Wait for ``work``; any timeout/peer failure becomes WeightSyncTimeout naming the peers."""
        try:
            work.wait(self.timeout)
        except Exception as e:
            others = [self._name(i) for i in range(self.world) if i != self.rank]
            raise WeightSyncTimeout(f"weight sync {what} failed or timed out after {self.timeout_s}s on rank "
                                    f"{self.rank}; peers: {others}: {e}") from e

    def _require(self, what: str) -> None:
        """Raise unless :meth:`join` succeeded."""
        if self.pg is None:
            raise WeightSyncError(f"weight sync {what}: group rank {self.rank} has not joined (call join())")

    def broadcast(self, tensor: torch.Tensor, what: str) -> None:
        """In-place broadcast from rank 0."""
        self._require(what)
        opts = dist.BroadcastOptions()
        opts.rootRank, opts.rootTensor = 0, 0
        self._wait(self.pg.broadcast([tensor], opts), what)

    def all_min(self, value: int, what: str) -> int:
        """MIN over the group of an int (used for the plan verdict)."""
        self._require(what)
        t = torch.tensor([value], dtype=torch.int32, device=self.device)
        opts = dist.AllreduceOptions()
        opts.reduceOp = dist.ReduceOp.MIN
        self._wait(self.pg.allreduce([t], opts), what)
        return int(t.item())

    def close(self) -> None:
        """Drop the group and the store (best effort)."""
        for attr in ("pg", "store"):
            obj = getattr(self, attr, None)
            if obj is not None and hasattr(obj, "shutdown"):
                try:
                    obj.shutdown()
                except Exception:
                    pass
            setattr(self, attr, None)
        if getattr(self, "_listen", None) is not None:
            self._listen.close()
            self._listen = None


def _flat(spec: TensorSpec, p: torch.Tensor) -> torch.Tensor:
    """The data of ``spec`` taken from parameter ``p`` as a flat tensor."""
    t = p.detach()
    if spec.rows is not None:
        t = t.index_select(0, torch.tensor(spec.rows, dtype=torch.long, device=t.device))
    return t.reshape(-1)


def send_weights(group: SyncGroup, model: nn.Module, plan: SyncPlan) -> dict[str, float]:
    """Rank 0 side of one sync: header, verdict, then one broadcast per bucket. Returns timings."""
    t0 = time.perf_counter()
    params = dict(model.named_parameters())
    header = torch.frombuffer(bytearray(pickle.dumps(plan)), dtype=torch.uint8).to(group.device)
    group.broadcast(torch.tensor([header.numel()], dtype=torch.int64, device=group.device), "header size")
    group.broadcast(header, "header")
    if group.all_min(1, "plan check") != 1:
        raise WeightSyncError("weight sync: a receiver rejected the plan (its log names the tensor); peers: "
                              f"{group.peers[1:]}")
    with torch.no_grad():
        for i, bucket in enumerate(plan.buckets):
            flat = torch.cat([_flat(s, params[s.name]) for s in bucket]).to(group.device)
            group.broadcast(flat, f"bucket {i}/{len(plan.buckets)}")
    return {"sync_s": time.perf_counter() - t0, "sync_bytes": float(plan.num_bytes),
            "sync_buckets": float(len(plan.buckets))}


def receive_weights(group: SyncGroup, model: nn.Module) -> dict[str, float]:
    """Receiver side of one sync: copies every bucket into ``model`` in place. Returns timings."""
    t0 = time.perf_counter()
    size = torch.zeros(1, dtype=torch.int64, device=group.device)
    group.broadcast(size, "header size")
    header = torch.empty(int(size.item()), dtype=torch.uint8, device=group.device)
    group.broadcast(header, "header")
    plan: SyncPlan = pickle.loads(header.cpu().numpy().tobytes())
    problem = check_plan(model, plan)
    if group.all_min(0 if problem else 1, "plan check") != 1:
        raise WeightSyncError(f"weight sync rank {group.rank} ({group.peers[group.rank]}): "
                              f"{problem or 'another receiver rejected the plan'}")
    params = dict(model.named_parameters())
    with torch.no_grad():
        for i, bucket in enumerate(plan.buckets):
            flat = torch.empty(sum(s.numel for s in bucket), dtype=_DTYPES[bucket[0].dtype], device=group.device)
            group.broadcast(flat, f"bucket {i}/{len(plan.buckets)}")
            offset = 0
            for s in bucket:
                p = params[s.name]
                chunk = flat[offset:offset + s.numel].view(s.shape).to(p.device)
                offset += s.numel
                if s.rows is None:
                    p.data.copy_(chunk)
                else:
                    p.data.index_copy_(0, torch.tensor(s.rows, dtype=torch.long, device=p.device), chunk)
    return {"sync_s": time.perf_counter() - t0, "sync_bytes": float(plan.num_bytes),
            "sync_buckets": float(len(plan.buckets)), "sync_version": float(plan.version)}


def resolve_backend(backend: str, model: nn.Module | None = None) -> str:
    """'auto' → 'nccl' when the model lives on CUDA, else 'gloo'."""
    if backend != "auto":
        return backend
    p = next(model.parameters(), None) if model is not None else None
    return "nccl" if (p is not None and p.is_cuda) else "gloo"


class WeightReceiver:
    """Receiver side for a rollout actor (compose it, or mix it in): ``init_group`` once, ``receive(model)`` per sync.

    The rollout actor exposes ``init_weight_sync(addr, port, rank, world)`` → ``init_group(...)`` and
    ``receive_weights()`` → ``receive(self.policy.model)``; ``LearnerGroup.sync_weights(actors)`` calls both
    concurrently with learner rank 0's send. ``last_stats`` holds the last sync's bytes / buckets / seconds.
    """

    def __init__(self, cfg: SyncConfig | None = None):
        """``cfg`` gives the timeout and backend used by :meth:`init_group` (defaults: SyncConfig())."""
        self.sync_cfg = cfg or SyncConfig()
        self._sync_group: SyncGroup | None = None
        self.last_stats: dict[str, float] = {}

    def init_group(self, addr: str, port: int, rank: int, world: int, timeout_s: float | None = None,
                   backend: str | None = None, peers: list[str] | None = None) -> float:
        """Join the sync group as ``rank`` (1..world-1); blocks until everyone joined (bounded). Returns seconds."""
        self.close_group()
        backend = backend or self.sync_cfg.backend
        if backend == "auto":
            backend = "nccl" if torch.cuda.is_available() else "gloo"
        timeout_s = self.sync_cfg.timeout_s if timeout_s is None else timeout_s
        self._sync_group = SyncGroup(addr, port, rank, world, backend, timeout_s, peers).join()
        return self._sync_group.join_s

    def receive(self, model: nn.Module) -> float:
        """Receive one sync into ``model`` (in place); returns seconds (details in ``last_stats``)."""
        if self._sync_group is None:
            raise WeightSyncError("receive() before init_group(): this rollout actor is not in a sync group")
        self.last_stats = receive_weights(self._sync_group, model)
        return self.last_stats["sync_s"]

    def close_group(self) -> None:
        """Leave the sync group (if any)."""
        if self._sync_group is not None:
            self._sync_group.close()
            self._sync_group = None
