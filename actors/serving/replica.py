"""The Serve replica of one reward expert: ``@serve.batch`` scoring, a health check, a msgpack HTTP route.

Deployed by :func:`actors.serving.deploy.deploy_rewards` (one deployment per expert). Handle callers send a
:class:`rewards.base.ScoreBatch` (or its ``to_dict()``) to ``score`` and get ``{"expert", "replica",
"request_id", "scores": float32 [B]}`` back. Every request is validated on its own before it joins a batch, so a
malformed one fails alone with :class:`actors.serving.errors.RewardRequestError` and the replica keeps serving.
"""
from __future__ import annotations

import asyncio
import logging
import sys
import threading
import time
from typing import Any

import numpy as np
from ray import serve

from actors.serving import metrics as reward_metrics
from actors.serving.errors import RewardRequestError
from rewards.base import ScoreBatch, decode_array, encode_array

log = logging.getLogger("ray.serve")

UNHEALTHY_AFTER_ERRORS = 3
"""Consecutive internal scoring errors after which the health check fails (Serve then replaces the replica)."""


def load_references(source: dict | None) -> tuple[dict[str, list[np.ndarray]], dict[str, str]]:
    """``({concept: [uint8 HWC]}, {concept: category})`` from the deploy-time source (store actor or data root)."""
    if not source:
        return {}, {}
    if "actor" in source:
        import ray

        store = ray.get_actor(source["actor"], namespace=source.get("namespace", "serve"))
        return ray.get(store.get.remote())
    return references_from_root(source["data_root"])


def references_from_root(data_root: str) -> tuple[dict[str, list], dict[str, str]]:
    """``({concept: [uint8 HWC]}, {concept: category})``: every concept's training images (``train/``, D14)."""
    from rl.data.reader import load_concept_dataset

    dataset = load_concept_dataset(data_root)
    refs = {name: [ref.load() for ref in c.train.references] for name, c in dataset.concepts.items()}
    return refs, {name: c.info.category for name, c in dataset.concepts.items()}


class ReferenceStore:
    """Holds ``{concept: [uint8 HWC images]}`` for the reward replicas (run as a detached Ray actor)."""

    def __init__(self, references: dict, categories: dict):
        self.references = references
        self.categories = categories

    def concepts(self) -> list[str]:
        """Concept names held."""
        return sorted(self.references)

    def get(self) -> tuple[dict, dict]:
        """All reference images and the known concept categories."""
        return self.references, self.categories


def as_score_batch(payload: Any) -> ScoreBatch:
    """A validated ScoreBatch from a ScoreBatch or its dict form; anything else is a RewardRequestError."""
    try:
        if isinstance(payload, ScoreBatch):
            return payload.validate()
        if isinstance(payload, dict):
            return ScoreBatch.from_dict(payload)
    except (ValueError, TypeError) as exc:
        raise RewardRequestError(f"malformed ScoreBatch: {exc}") from exc
    raise RewardRequestError(f"expected a ScoreBatch or its to_dict() form, got {type(payload).__name__}")


def _signature(b: ScoreBatch) -> tuple:
    """Requests with the same signature can be concatenated into one expert call."""
    return (b.images.shape[1:] if b.images is not None else None,
            tuple(name for name in ("texts", "concepts", "candidates", "targets") if getattr(b, name) is not None))


def concat(batches: list[ScoreBatch]) -> ScoreBatch:
    """Concatenate same-signature batches sample-wise."""
    if len(batches) == 1:
        return batches[0]
    join = lambda name: None if getattr(batches[0], name) is None else [x for b in batches for x in getattr(b, name)]
    return ScoreBatch(images=None if batches[0].images is None else np.concatenate([b.images for b in batches]),
                      texts=join("texts"), concepts=join("concepts"), candidates=join("candidates"),
                      targets=join("targets"))


class RewardReplica:
    """One replica of one expert (wrapped by ``serve.deployment`` at deploy time)."""

    def __init__(self, expert: str, expert_config, max_batch_size: int, batch_wait_timeout_s: float,
                 references: dict | None = None, weighted_categories: list[str] | None = None):
        from actors.cluster.patches import bind_serve_replica_grpc_to_node_ip
        from rewards.registry import build_expert

        bind_serve_replica_grpc_to_node_ip()   # Serve's internal gRPC port: node IP only, not every interface
        t0 = time.monotonic()
        self.name = expert
        self.expert = build_expert(expert, expert_config)
        refs, concept_categories = load_references(references)
        if weighted_categories:  # only concepts whose category weights this expert (FER: humans)
            refs = {c: v for c, v in refs.items()
                    if c not in concept_categories or concept_categories[c] in weighted_categories}
        for concept, images in refs.items():
            self.expert.add_reference(concept, list(images))
        self.concepts = sorted(refs)
        try:
            self.replica_id = serve.get_replica_context().replica_id.unique_id
        except Exception:  # noqa: BLE001 - outside Serve (direct construction in tests)
            self.replica_id = "local"
        self._scored.set_max_batch_size(max_batch_size)
        self._scored.set_batch_wait_timeout_s(batch_wait_timeout_s)
        self._lock = threading.Lock()  # one expert call at a time (batches vs. health checks)
        self._held = 0
        self._errors = 0
        self._probe = self._make_probe(refs)
        if self._probe is not None:
            self._call_expert(self._probe)  # fail at start-up, not at the first request
        log.info("reward replica %s/%s ready in %.1fs (concepts %s)", expert, self.replica_id,
                 time.monotonic() - t0, self.concepts)

    # ------------------------------------------------------------------------------------------ internals
    def _make_probe(self, refs: dict) -> ScoreBatch | None:
        """A one-sample batch this expert can score (None when it needs references and has none)."""
        if self.expert.uses_references and not refs:
            return None
        concept = self.concepts[0] if self.concepts else "probe"
        image = refs[concept][0] if refs else np.full((32, 32, 3), 127, np.uint8)
        return ScoreBatch(images=np.asarray(image, np.uint8)[None], texts=["a photo"], concepts=[concept],
                          candidates=[["a photo", "a drawing"]], targets=[0])

    def _call_expert(self, batch: ScoreBatch) -> np.ndarray:
        with self._lock:
            return self.expert.score(batch)

    def _check_fields(self, batch: ScoreBatch) -> None:
        missing = [f for f in self.expert.requires if getattr(batch, f) is None]
        if missing:
            raise RewardRequestError(f"{self.name}: ScoreBatch field(s) {missing} are required "
                                     f"(this expert reads {list(self.expert.requires)})")
        if self.expert.uses_references:
            unknown = sorted({c for c in batch.concepts if c not in self.concepts})
            if unknown:
                raise RewardRequestError(f"{self.name}: no reference images for concept(s) {unknown}; "
                                         f"registered: {self.concepts}")

    def _score_groups(self, batches: list[ScoreBatch]) -> list[Any]:
        """Score a list of requests: same-signature ones in one call; a failing group is retried request by
        request so one request's error never fails its batch-mates. Returns arrays or exceptions."""
        out: list[Any] = [None] * len(batches)
        groups: dict[tuple, list[int]] = {}
        for i, b in enumerate(batches):
            groups.setdefault(_signature(b), []).append(i)
        for idx in groups.values():
            try:
                scores = self._call_expert(concat([batches[i] for i in idx]))
                offsets = np.cumsum([0] + [len(batches[i]) for i in idx])
                for k, i in enumerate(idx):
                    out[i] = scores[offsets[k]:offsets[k + 1]].copy()
            except Exception:  # noqa: BLE001 - isolate below
                for i in idx:
                    try:
                        out[i] = self._call_expert(batches[i])
                    except Exception as exc:  # noqa: BLE001 - returned to that request's caller
                        out[i] = exc
        return out

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def _scored(self, batches: list[ScoreBatch]) -> list[Any]:
        return await asyncio.to_thread(self._score_groups, batches)

    async def _score(self, batch: ScoreBatch) -> np.ndarray:
        t0 = time.monotonic()
        self._held += 1
        reward_metrics.set_queue_depth(self.name, self.replica_id, self._held)
        try:
            result = await self._scored(batch)
        finally:
            self._held -= 1
            reward_metrics.set_queue_depth(self.name, self.replica_id, self._held)
        if isinstance(result, Exception):
            self._errors += 1
            reward_metrics.count_failure(self.name, "error")
            log.warning("%s: scoring failed: %s: %s", self.name, type(result).__name__, result)
            raise result
        self._errors = 0
        reward_metrics.count_scored(self.name, len(batch))
        reward_metrics.observe_latency(self.name, time.monotonic() - t0, "replica")
        return result

    def _validated(self, payload: Any) -> ScoreBatch:
        batch = as_score_batch(payload)
        self._check_fields(batch)
        return batch

    # ------------------------------------------------------------------------------------------ public API
    async def score(self, payload: Any, request_id: Any = None) -> dict:
        """Score one request (a ScoreBatch or its dict): ``{"expert", "replica", "request_id", "scores"}``."""
        try:
            batch = self._validated(payload)
        except RewardRequestError:
            reward_metrics.count_failure(self.name, "bad_request")
            raise
        scores = await self._score(batch)
        return {"expert": self.name, "replica": self.replica_id, "request_id": request_id, "scores": scores}

    def describe(self) -> dict:
        """What the expert reads, which concepts it has references for, the interpreter it runs in, and how many
        requests it holds now (``held``: waiting for a batch or being scored)."""
        return {"expert": self.name, "replica": self.replica_id, "requires": list(self.expert.requires),
                "uses_references": self.expert.uses_references, "concepts": self.concepts, "python": sys.executable,
                "held": self._held}

    async def check_health(self) -> None:
        """Serve's health check: a one-sample self-score (and not too many consecutive internal errors)."""
        if self._errors >= UNHEALTHY_AFTER_ERRORS:
            raise RuntimeError(f"{self.name}: {self._errors} consecutive scoring errors")
        if self._probe is not None:
            await asyncio.to_thread(self._call_expert, self._probe)

    async def __call__(self, request) -> Any:
        """HTTP: ``POST`` a msgpack ``ScoreBatch.to_dict()`` (+ optional "request_id"); msgpack reply with
        ``scores`` encoded like ScoreBatch arrays. Malformed bodies get 400, scoring errors 500."""
        import msgpack
        from starlette.responses import Response

        def reply(body: dict, status: int = 200) -> Response:
            return Response(msgpack.packb(body, use_bin_type=True), status_code=status,
                            media_type="application/msgpack")

        if request.method != "POST":
            return reply({"error": f"{self.name}: use POST with a msgpack body"}, 405)
        body = await request.body()
        try:
            try:
                payload = msgpack.unpackb(body, raw=False)
            except Exception as exc:  # noqa: BLE001 - msgpack raises several unrelated types
                raise RewardRequestError(f"body is not valid msgpack ({type(exc).__name__}: {exc})") from exc
            if not isinstance(payload, dict):
                raise RewardRequestError(f"body must be a msgpack map, got {type(payload).__name__}")
            request_id = payload.pop("request_id", None)
            batch = self._validated(payload)
        except RewardRequestError as exc:
            reward_metrics.count_failure(self.name, "bad_request")
            return reply({"error": f"{self.name}: {exc}"}, 400)
        try:
            scores = await self._score(batch)
        except Exception as exc:  # noqa: BLE001 - reported to the HTTP caller
            return reply({"error": f"{self.name}: {type(exc).__name__}: {exc}"}, 500)
        return reply({"expert": self.name, "replica": self.replica_id, "request_id": request_id,
                      "scores": encode_array(np.asarray(scores, np.float32))})


def decode_http_reply(body: bytes) -> dict:
    """Parse an HTTP reply of :meth:`RewardReplica.__call__` (scores decoded to float32 [B])."""
    import msgpack

    out = msgpack.unpackb(body, raw=False)
    if "scores" in out:
        out["scores"] = decode_array(out["scores"], "reply scores")
    return out
