"""Errors of the reward service, shared by its deployments, replicas and clients."""
from __future__ import annotations


class RewardRequestError(ValueError):
    """A malformed scoring request (wrong dtype/shape, empty batch, missing field, bad msgpack body)."""


class RewardServiceError(RuntimeError):
    """A reward expert could not score a request; names the expert and the cause."""

    def __init__(self, expert: str, cause: str):
        super().__init__(f"reward expert {expert!r} failed: {cause}")
        self.expert = expert
        self.cause = cause
