"""Scoring through the reward deployments: per-expert timeout, retries, required/optional, ensemble total.

Nothing is ever silently scored: an expert either returns finite scores for its samples, or (after its retries)
raises :class:`RewardServiceError` when required, or is reported in ``RewardResult.dropped`` (with a logged
warning and the ensemble weights of the affected samples renormalised) when optional.
"""
from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from actors.cluster.deaths import classify
from actors.serving import metrics as reward_metrics
from actors.serving.deploy import app_name, deployment_name, replicas
from actors.serving.errors import RewardRequestError, RewardServiceError
from configs.serve import ServeConfig
from rewards.base import ScoreBatch
from rewards.ensemble import RewardEnsemble

log = logging.getLogger(__name__)

@dataclass
class RewardResult:
    """What :meth:`RewardClient.score_all` returns."""

    per_expert: dict[str, np.ndarray]
    """expert -> float32 [B] scores (0 on samples whose category gives the expert no weight)."""
    total: np.ndarray
    """float32 [B] ensemble reward."""
    dropped: list[str] = field(default_factory=list)
    """Optional experts that failed this call (their weight was renormalised away)."""
    failures: dict[str, int] = field(default_factory=dict)
    """expert -> failed attempts during this call (retried or not)."""
    errors: dict[str, str] = field(default_factory=dict)
    """expert -> last error message, for experts that failed at least once."""
    weights: dict[str, np.ndarray] = field(default_factory=dict)
    """expert -> float32 [B] effective ensemble weights."""
    notes: list[str] = field(default_factory=list)
    """Ensemble notes (which samples were renormalised)."""


def _kind(exc: BaseException) -> str:
    """The failure kind a failed attempt is counted under (``reward_serve_failures{kind}``)."""
    from ray.serve.exceptions import DeploymentUnavailableError, ReplicaUnavailableError, RequestCancelledError

    if isinstance(exc, RewardRequestError):
        return "bad_request"
    death = classify(exc)
    if (death is not None and death.cause != "hung") or isinstance(exc, (DeploymentUnavailableError,
                                                                        ReplicaUnavailableError)):
        return "replica_died"
    if isinstance(exc, TimeoutError) or death is not None:
        return "timeout"
    if isinstance(exc, RequestCancelledError):
        return "cancelled"
    return "error"


def _message(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[-1] if text else ''}"


class _Call:
    """One expert's request within a score_all: its attempts and outcome."""

    def __init__(self, expert: str, rows: list[int], batch: ScoreBatch):
        self.expert, self.rows, self.batch = expert, rows, batch
        self.attempt = 0
        self.response = None
        self.deadline = 0.0
        self.started = 0.0
        self.request_id = ""
        self.scores: np.ndarray | None = None
        self.failures = 0
        self.error: str | None = None
        self.fatal = False


class RewardClient:
    """Calls the expert deployments with numpy batches; usable from any process connected to the Ray cluster."""

    def __init__(self, cfg: ServeConfig, ensemble: RewardEnsemble | None = None):
        self.cfg = cfg
        self.ensemble = ensemble or RewardEnsemble(cfg.ensemble)
        self._handles: dict[str, Any] = {}
        self._describe: dict[str, dict] = {}
        self.failure_totals: dict[str, int] = {}
        """expert -> failed attempts since this client was created."""

    # ------------------------------------------------------------------------------------------- handles
    def handle(self, expert: str):
        """The deployment handle of ``expert`` (method ``score``)."""
        if expert not in self._handles:
            if expert not in self.cfg.enabled:
                raise ValueError(f"reward expert {expert!r} is not enabled (serve.enabled: {self.cfg.enabled})")
            from ray import serve

            self._handles[expert] = serve.get_deployment_handle(deployment_name(expert), app_name(self.cfg, expert))
        return self._handles[expert]

    def describe(self, expert: str) -> dict:
        """What the expert reads (``requires``) and its registered concepts (asks a replica once; cached)."""
        if expert not in self._describe:
            self._describe[expert] = self.handle(expert).options(method_name="describe").remote().result(
                timeout_s=max(30.0, self.cfg.expert(expert).timeout_s))
        return self._describe[expert]

    def _payload(self, expert: str, batch: ScoreBatch) -> ScoreBatch:
        """Send only the fields the expert reads (no images to TIER, no candidates to DER...)."""
        import importlib

        from rewards.registry import EXPERTS

        module, cls, _ = EXPERTS[expert]
        keep = set(getattr(importlib.import_module(module), cls).requires)
        return ScoreBatch(**{f: (getattr(batch, f) if f in keep else None)
                             for f in ("images", "texts", "concepts", "candidates", "targets")})

    # ------------------------------------------------------------------------------------------- calls
    def _issue(self, call: _Call) -> None:
        ecfg = self.cfg.expert(call.expert)
        call.attempt += 1
        call.request_id = uuid.uuid4().hex
        call.started = time.monotonic()
        call.deadline = call.started + ecfg.timeout_s
        call.response = self.handle(call.expert).options(method_name="score").remote(call.batch, call.request_id)

    def _collect(self, call: _Call) -> bool:
        """Wait for the call's current attempt; True when finished (scores or final failure)."""
        ecfg = self.cfg.expert(call.expert)
        try:
            out = call.response.result(timeout_s=max(0.0, call.deadline - time.monotonic()))
            if out.get("request_id") != call.request_id:
                raise RuntimeError(f"reply for request {out.get('request_id')!r}, expected {call.request_id!r}")
            scores = np.asarray(out["scores"], dtype=np.float32)
            if scores.shape != (len(call.batch),) or not np.all(np.isfinite(scores)):
                raise RuntimeError(f"reply scores have shape {scores.shape} / non-finite values")
            call.scores = scores
            reward_metrics.observe_latency(call.expert, time.monotonic() - call.started, "client")
            return True
        except Exception as exc:  # noqa: BLE001 - classified, counted, retried or reported
            kind = _kind(exc)
            if kind == "timeout":
                call.response.cancel()
            call.failures += 1
            self.failure_totals[call.expert] = self.failure_totals.get(call.expert, 0) + 1
            call.error = f"attempt {call.attempt}/{ecfg.retries + 1}: {kind}: {_message(exc)}"
            reward_metrics.count_failure(call.expert, kind)
            log.warning("reward expert %s: %s", call.expert, call.error)
            if kind == "bad_request" or call.attempt > ecfg.retries:
                call.fatal = True
                return True
            return False

    def _run(self, calls: list[_Call]) -> None:
        """All experts' attempts run concurrently; failed ones are re-issued after a backoff."""
        for call in calls:
            self._issue(call)
        pending = list(calls)
        while pending:
            retry = [c for c in pending if not self._collect(c)]
            if retry:
                time.sleep(self.cfg.retry_backoff_s * max(c.attempt for c in retry))
                for call in retry:
                    self._issue(call)
            pending = retry

    def _required(self, expert: str) -> bool:
        return self.cfg.expert(expert).required or expert in self.ensemble.config.required

    def score_expert(self, expert: str, batch: ScoreBatch) -> np.ndarray:
        """Scores of one expert (with its timeout and retries); failure raises RewardServiceError."""
        batch.validate()
        call = _Call(expert, list(range(len(batch))), self._payload(expert, batch))
        self._run([call])
        if call.scores is None:
            raise RewardServiceError(expert, call.error or "no result")
        return call.scores

    def score_all(self, batch: ScoreBatch, categories: list[str],
                  expert_batches: dict[str, ScoreBatch] | None = None) -> RewardResult:
        """Per-expert scores, the ensemble total, dropped experts and failure counts for one batch.

        Each expert scores only the samples whose category weights it; ``expert_batches`` gives some experts their
        own batch of the same samples (e.g. TIER scores the answer texts). A required expert that still fails
        after its retries raises :class:`RewardServiceError` naming it and the cause.
        """
        batch.validate()
        n = len(batch)
        if len(categories) != n:
            raise ValueError(f"score_all: {len(categories)} categories for a batch of {n} samples")
        for name, own in (expert_batches or {}).items():
            if len(own.validate()) != n:
                raise ValueError(f"score_all: expert_batches[{name!r}] has {len(own)} samples, expected {n}")
        weights = self.ensemble.config.weights
        unknown = sorted({c for c in categories if c not in weights})
        if unknown:
            raise ValueError(f"score_all: unknown categories {unknown}; known: {sorted(weights)}")
        calls, unavailable = [], []
        for expert in self.ensemble.config.experts:
            rows = [i for i, c in enumerate(categories) if weights[c].get(expert, 0) > 0]
            if not rows:
                continue
            if expert not in self.cfg.enabled:
                unavailable.append(expert)
                continue
            src = (expert_batches or {}).get(expert, batch)
            sub = src if len(rows) == n else src.select(rows)
            calls.append(_Call(expert, rows, self._payload(expert, sub)))
        for expert in unavailable:
            if self._required(expert):
                raise RewardServiceError(expert, "required but not deployed (it is not in serve.enabled)")
        self._run(calls)
        per_expert, dropped = {}, list(unavailable)
        for call in calls:
            if call.scores is None:
                if self._required(call.expert):
                    raise RewardServiceError(call.expert, f"{call.error} (after {call.attempt} attempt(s))")
                log.warning("reward expert %s dropped for this step (optional): %s", call.expert, call.error)
                reward_metrics.count_failure(call.expert, "dropped")
                dropped.append(call.expert)
                continue
            full = np.zeros(n, dtype=np.float32)
            full[call.rows] = call.scores
            per_expert[call.expert] = full
        ens = self.ensemble.combine(per_expert, categories)
        return RewardResult(per_expert=ens.per_expert, total=ens.total, dropped=sorted(dropped),
                            failures={c.expert: c.failures for c in calls},
                            errors={c.expert: c.error for c in calls if c.error},
                            weights=ens.weights, notes=ens.notes)

    def refresh_replica_metrics(self) -> dict[str, int]:
        """Set the replicas gauge of every enabled expert from the Serve controller; returns the counts."""
        counts = {}
        for expert in self.cfg.enabled:
            counts[expert] = sum(r["state"] == "RUNNING" for r in replicas(self.cfg, expert))
            reward_metrics.set_replicas(expert, counts[expert])
        return counts


def http_score(url: str, batch: ScoreBatch, timeout_s: float = 60.0, request_id: Any = None) -> np.ndarray:
    """Score through an expert's msgpack HTTP route (``http://127.0.0.1:<port>/rewards/<expert>``).

    A 4xx/5xx reply raises RewardServiceError with the server's message.
    """
    import msgpack
    import requests

    from actors.serving.replica import decode_http_reply

    body = dict(batch.to_dict(), request_id=request_id)
    resp = requests.post(url, data=msgpack.packb(body, use_bin_type=True), timeout=timeout_s,
                         headers={"Content-Type": "application/msgpack"})
    try:
        out = decode_http_reply(resp.content)
    except Exception as exc:  # noqa: BLE001 - non-msgpack reply (e.g. proxy 404 text)
        raise RewardServiceError(url, f"HTTP {resp.status_code}: {resp.text[:200]!r}") from exc
    if resp.status_code != 200:
        raise RewardServiceError(url, f"HTTP {resp.status_code}: {out.get('error', out)}")
    return out["scores"]
