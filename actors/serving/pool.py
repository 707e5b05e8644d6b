"""What one run owns of the reward service (``serve.mode``): deploy or attach at start, give back exactly that."""
from __future__ import annotations

import logging

from actors.serving.deploy import (
    app_name,
    deployed_apps,
    ensure_serve,
    shutdown_rewards,
    submit_rewards,
    wait_deployed,
    wait_for_replicas,
)
from actors.serving.errors import RewardServiceError

log = logging.getLogger(__name__)


class RewardPool:
    """What one run owns of the reward service (``serve.mode``), so that it can give back exactly that.

    ``start()`` — owned: starts Serve if needed, deletes stale applications of the run's names (a crashed earlier
    run), submits the enabled experts; shared: checks that every enabled expert's application exists.
    ``wait_ready()`` — waits until every enabled expert has its replicas running (owned: the ones ``start``
    submitted; shared: at least one each), so other roles can start between the two calls.
    ``close()`` — owned: deletes the run's applications and reference store, and shuts Serve down when ``start``
    started it; shared: nothing. Safe to call more than once and after a failed ``start``."""

    def __init__(self, cfg):
        self.cfg = getattr(cfg, "serve", cfg)
        self.owned = self.cfg.mode == "owned"
        self.started_serve = False
        self.stale_replaced: list[str] = []
        """Applications of the run's names found at start and replaced (owned mode)."""
        self._open = False
        self._pending = None

    def check(self) -> None:
        """Fail before any work when ``shared`` and an enabled expert's application is not deployed."""
        cfg = self.cfg
        cfg.validate()
        if not self.owned:
            have = set(deployed_apps(cfg))
            missing = [app_name(cfg, e) for e in cfg.enabled if app_name(cfg, e) not in have]
            if missing:
                raise RewardServiceError(",".join(missing), "serve.mode=shared but these applications are not "
                                         "deployed; start the reward pool first (or use serve.mode=owned)")

    def start(self, data_root=None) -> None:
        """Submit (owned) or find (shared) the reward experts; :meth:`wait_ready` waits for their replicas."""
        cfg = self.cfg
        self.check()
        if not self.owned:
            return
        self._open = True
        self.started_serve = ensure_serve(cfg)
        stale = deployed_apps(cfg)
        if stale:
            log.warning("replacing stale reward applications %s (left by an earlier run that did not end "
                        "cleanly; this run owns serve.app_name=%r)", stale, cfg.app_name)
            self.stale_replaced = stale
            shutdown_rewards(cfg)
        self._pending = submit_rewards(cfg, data_root=data_root)

    def wait_ready(self) -> None:
        """Wait for the replicas of :meth:`start`'s experts (``serve.deploy_timeout_s`` each)."""
        cfg = self.cfg
        if not self.owned:
            for e in cfg.enabled:
                wait_for_replicas(cfg, e, 1, timeout_s=cfg.deploy_timeout_s)
            log.info("using the shared reward pool %s (left running at the end of the run)", cfg.enabled)
            return
        if self._pending is None:
            raise RuntimeError("RewardPool.wait_ready before start")
        wait_deployed(self._pending)
        self._pending = None

    def close(self) -> None:
        """Give back what :meth:`start` deployed (owned mode only)."""
        if not (self.owned and self._open):
            return
        self._open = False
        try:
            shutdown_rewards(self.cfg)
            if self.started_serve:
                from ray import serve

                serve.shutdown()
            log.info("reward applications of this run deleted%s", " and Serve shut down" if self.started_serve
                     else "")
        except Exception as exc:   # Ray already gone (e.g. the cluster died): nothing left to delete here
            log.warning("could not delete the reward applications: %s", exc)
