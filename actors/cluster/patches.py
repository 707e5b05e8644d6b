"""Every patch of a library's internals, in one place (issue 23).

A patch here replaces an attribute inside a library (DeepSpeed, Ray Serve) because the library offers no option for
what the service needs. Each one is a :class:`Patch`: what it replaces, why, the library version it was written and
checked against, and an idempotent ``apply`` function that the process needing it calls (a learner rank, a reward
replica). ``tests/test_patches.py`` fails loudly when an upgrade breaks a patch (the patched attribute is gone, the
upstream code no longer calls it) or obsoletes it (the upstream behaviour the patch works around is fixed), and when
the installed version is not the one the patch was checked against.

:data:`INTERNALS_USED` lists the private APIs the service *reads* elsewhere (no replacement, no public equivalent in
the pinned versions); the same test checks that each one still resolves.

No module outside this one assigns into a third-party module (``tests/test_patches.py`` scans the code for it).
"""
from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass
from typing import Any, Callable

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Patch:
    """One patch of a library's internals."""

    name: str
    library: str
    """Distribution name (``importlib.metadata.version`` of it is compared with ``written_against``)."""
    written_against: str
    """The library version the patch was written and verified against."""
    target: str
    """``module:attribute`` replaced."""
    reason: str
    apply: Callable[[], Any]
    """Idempotent: applying twice leaves the same state as once; returns a truthy value when the patch is in place."""


@dataclass(frozen=True)
class InternalUse:
    """A private API the service reads (does not replace): it must still resolve after an upgrade."""

    library: str
    target: str
    """``module:attribute.chain``."""
    where: str
    why: str


def resolve(target: str) -> Any:
    """The object named by ``module:attr.chain`` (ImportError / AttributeError when it no longer exists)."""
    module, _, attrs = target.partition(":")
    obj: Any = importlib.import_module(module)
    for part in filter(None, attrs.split(".")):
        obj = getattr(obj, part)
    return obj


# ---------------------------------------------------------------------------------------------------- DeepSpeed
DEEPSPEED_SHM_TARGET = "deepspeed.comm.torch:build_shm_op"


def _no_shm_op() -> None:
    """Stand-in for ``deepspeed.comm.torch.build_shm_op``: no shared-memory collective op (every collective goes
    through the torch.distributed process group the learner set up)."""
    return None


def skip_deepspeed_shm_build() -> bool:
    """Make DeepSpeed's torch comm backend skip building its CPU shared-memory all-reduce op. Idempotent.

    Returns True when in place; False (with a warning) when DeepSpeed no longer has the attribute (the build, if
    any, then happens as upstream does it)."""
    mod = importlib.import_module("deepspeed.comm.torch")
    current = getattr(mod, "build_shm_op", None)
    if current is _no_shm_op:
        return True
    if current is None:
        log.warning("DeepSpeed patch %s: deepspeed.comm.torch.build_shm_op is gone (DeepSpeed upgraded?); not "
                    "patched, see tests/test_patches.py", DEEPSPEED_SHM_TARGET)
        return False
    _no_shm_op.replaced = current   # upstream's function, for tests/test_patches.py to restore
    mod.build_shm_op = _no_shm_op
    return True


# ---------------------------------------------------------------------------------------------------- Ray Serve
SERVE_GRPC_TARGET = "ray.serve._private.replica:add_port_to_grpc_server"


def bind_serve_replica_grpc_to_node_ip() -> str | None:
    """Keep a Serve replica's internal gRPC server off the network's other interfaces. Idempotent.

    Ray Serve 2.60 starts each replica's inter-deployment gRPC server on ``[::]:0`` (every interface; no option,
    ``ray/serve/_private/replica.py``), after the replica's constructor. Called from inside that constructor, this
    makes it bind the replica's Ray node IP instead: 127.0.0.1 on a loopback cluster, the node's cluster address
    on a real one (where handles on other nodes reach it). Returns the address used, or None (with a warning) when
    Serve's internals are not as expected (then the port stays on every interface: see the README's security
    section for the firewall mitigation)."""
    import ray

    try:
        from ray.serve._private import replica as serve_replica

        original = serve_replica.add_port_to_grpc_server
    except (ImportError, AttributeError) as exc:
        log.warning("cannot bind the Serve replica gRPC server to the node IP (%s); it listens on all interfaces",
                    exc)
        return None
    if getattr(original, "bound_to", None):
        return original.bound_to
    ip = ray.util.get_node_ip_address()
    host = f"[{ip}]" if ":" in ip else ip

    def bound(server, address):
        if address.startswith("[::]:"):
            address = f"{host}:{address[len('[::]:'):]}"
        return original(server, address)

    bound.bound_to = ip
    bound.original = original
    serve_replica.add_port_to_grpc_server = bound
    return ip


# ---------------------------------------------------------------------------------------------------- registry
PATCHES: tuple[Patch, ...] = (
    Patch(
        name="deepspeed-skip-shm-op",
        library="deepspeed",
        written_against="0.19.8",
        target=DEEPSPEED_SHM_TARGET,
        reason=("deepspeed.init_distributed builds TorchBackend, whose __init__ calls build_shm_op(): on the CPU "
                "accelerator that JIT-compiles the ShareMemCommBuilder C++ op on every learner rank (needs a "
                "compiler, tens of seconds per rank, fails without one) and then routes all-reduces through "
                "shared memory, which only works between ranks on one host. The learner's collectives go through "
                "the gloo/NCCL process group it initialised itself (multi-node ranks included), so no shm op. "
                "Applied by actors/learner/group.py before deepspeed.init_distributed."),
        apply=skip_deepspeed_shm_build,
    ),
    Patch(
        name="serve-replica-grpc-node-ip",
        library="ray",
        written_against="2.60.0",
        target=SERVE_GRPC_TARGET,
        reason=("Ray Serve starts every replica's inter-deployment gRPC server on [::]:0 (all interfaces, no "
                "option); the service keeps every port on the node IP (loopback on a private cluster). Applied by "
                "actors/serving/replica.py in each replica's constructor, before Serve binds the port."),
        apply=bind_serve_replica_grpc_to_node_ip,
    ),
)
"""Every patch of a library's internals the service applies."""

INTERNALS_USED: tuple[InternalUse, ...] = (
    InternalUse("ray", "ray.serve._private.common:DeploymentID", "actors/serving/deploy.py scale_expert",
                "the external-scaler call names the deployment by its internal id"),
    InternalUse("ray", "ray.serve._private.controller:ServeController.update_deployment_replicas",
                "actors/serving/deploy.py scale_expert",
                "in-place replica count (external scaler); Ray 2.60's only public route is the dashboard's REST API, "
                "which a private cluster does not run"),
    InternalUse("ray", "ray.serve.context:_get_global_client", "actors/serving/deploy.py",
                "Serve details (replica ids and states), the HTTP config and the controller handle"),
    InternalUse("ray", "ray._private.state:actors", "actors/cluster/deaths.py (_actor_table)",
                "the GCS actor table (death cause, restarts) without the dashboard that ray.util.state needs"),
)
"""Private APIs read elsewhere (kept where they are used); each must still resolve."""
