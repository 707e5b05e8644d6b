"""Child side of :class:`rewards.process_expert.ProcessExpert`: ``python -m rewards.process_worker``.

Reads ``(method, args)`` frames on stdin and answers ``("ok", result)`` or ``("error", (type name, message))`` on
the original stdout; everything printed by libraries goes to stderr. The first call must be ``build``.
"""
from __future__ import annotations

import os
import sys


def main() -> int:
    """Serve one expert until ``exit`` or end of input."""
    channel_out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)                      # prints from libraries go to stderr, never into the channel
    sys.stdout = sys.stderr
    channel_in = sys.stdin.buffer

    from rewards.process_expert import recv_frame, send_frame

    expert = None
    while True:
        try:
            method, args = recv_frame(channel_in)
        except EOFError:
            return 0
        if method == "exit":
            return 0
        try:
            if method == "build":
                from rewards.registry import build_expert

                expert = build_expert(*args)
                result = {"requires": list(expert.requires), "uses_references": expert.uses_references}
            elif expert is None:
                raise RuntimeError("the expert is not built yet")
            elif method in ("score", "add_reference", "has_reference", "dimension_scores"):
                result = getattr(expert, method)(*args)
            else:
                raise ValueError(f"unknown method {method!r}")
            send_frame(channel_out, ("ok", result))
        except Exception as exc:  # noqa: BLE001 - every failure goes back to the caller
            send_frame(channel_out, ("error", (type(exc).__name__, str(exc))))


if __name__ == "__main__":
    sys.exit(main())
