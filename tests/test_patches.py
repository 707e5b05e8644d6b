"""The library patches (actors/cluster/patches.py) still fit the installed libraries: each patched attribute exists
and is still what upstream calls, the upstream behaviour each patch works around is still there (else the patch is
obsolete), each applies idempotently, the versions are the ones the patches were checked against, the private APIs
read elsewhere still resolve, and no other module patches a library."""
from __future__ import annotations

import ast
import importlib
import importlib.metadata
import inspect
import re
import sys
from pathlib import Path

import pytest

from actors.cluster import patches
from actors.cluster.patches import INTERNALS_USED, PATCHES, resolve

ROOT = Path(__file__).resolve().parents[1]
PROJECT = ("actors", "rl", "configs", "launch", "backbone", "rewards", "tests")


@pytest.mark.parametrize("patch", PATCHES, ids=lambda p: p.name)
def test_installed_version_is_the_one_the_patch_was_checked_against(patch):
    """An upgrade must re-verify the patch (run this file, read the upstream code) and then bump ``written_against``."""
    installed = importlib.metadata.version(patch.library)
    assert installed == patch.written_against, (
        f"patch {patch.name!r} ({patch.target}) was written against {patch.library} {patch.written_against}, "
        f"installed is {installed}: re-check it (reason: {patch.reason}) and update written_against")


@pytest.mark.parametrize("patch", PATCHES, ids=lambda p: p.name)
def test_patched_attribute_exists(patch):
    assert callable(resolve(patch.target)), f"{patch.target} no longer exists: patch {patch.name!r} is broken"


def _global_lookups(module, name: str) -> list[str]:
    """Functions of ``module`` (and its classes' methods) that look ``name`` up as a module global at call time."""
    found = []
    for obj in vars(module).values():
        members = vars(obj).values() if inspect.isclass(obj) and obj.__module__ == module.__name__ else [obj]
        for fn in members:
            code = getattr(inspect.unwrap(fn) if callable(fn) else fn, "__code__", None)
            if code is not None and getattr(fn, "__module__", None) == module.__name__ and name in code.co_names:
                found.append(fn.__qualname__)
    return found


def test_deepspeed_shm_patch_still_needed_and_idempotent():
    """TorchBackend still calls the module-global ``build_shm_op()`` (so replacing it takes effect), and on the CPU
    accelerator that call would still JIT-build the shared-memory op (else the patch is obsolete)."""
    comm_torch = importlib.import_module("deepspeed.comm.torch")
    from deepspeed.accelerator import get_accelerator
    import deepspeed.ops

    assert "TorchBackend.__init__" in _global_lookups(comm_torch, "build_shm_op"), (
        "deepspeed.comm.torch.TorchBackend.__init__ no longer calls build_shm_op(): patch 'deepspeed-skip-shm-op' "
        "has no effect any more (obsolete or moved); re-check how DeepSpeed builds its CPU shm op")
    original = getattr(comm_torch.build_shm_op, "replaced", comm_torch.build_shm_op)   # upstream's, even if applied
    comm_torch.build_shm_op = original
    if get_accelerator().device_name() == "cpu":
        builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
        assert builder is not None and deepspeed.ops.__compatible_ops__.get(builder.NAME, False), (
            "DeepSpeed's CPU accelerator no longer offers a compatible ShareMemCommBuilder: build_shm_op() would "
            "return None by itself, so patch 'deepspeed-skip-shm-op' is obsolete")
    try:
        assert patches.skip_deepspeed_shm_build() is True
        assert comm_torch.build_shm_op is patches._no_shm_op and comm_torch.build_shm_op() is None
        assert patches.skip_deepspeed_shm_build() is True and comm_torch.build_shm_op is patches._no_shm_op
    finally:
        comm_torch.build_shm_op = original


class _FakeGrpcServer:
    """Records the addresses a gRPC server is asked to listen on."""

    def __init__(self):
        self.addresses = []

    def add_insecure_port(self, address):
        self.addresses.append(address)
        return 4242


def test_serve_grpc_patch_still_needed_and_idempotent(monkeypatch):
    """Serve still binds every replica's gRPC server to ``[::]:0`` through the module-global helper (else the patch
    is obsolete or ineffective); the patch rewrites that wildcard to the node IP, leaves other addresses alone and
    applies once however often it is called."""
    import ray
    from ray.serve._private import replica as serve_replica

    source = inspect.getsource(serve_replica)
    assert re.search(r'add_port_to_grpc_server\(\s*self\._server,\s*"\[::\]:0"\s*\)', source), (
        "Ray Serve no longer binds the replica gRPC server with add_port_to_grpc_server(self._server, \"[::]:0\"): "
        "patch 'serve-replica-grpc-node-ip' is obsolete (upstream binds elsewhere) or no longer takes effect")
    assert _global_lookups(serve_replica, "add_port_to_grpc_server"), (
        "ray.serve._private.replica no longer looks add_port_to_grpc_server up as a module global: replacing the "
        "module attribute has no effect")
    monkeypatch.delenv("RAY_USE_TLS", raising=False)
    original = getattr(serve_replica.add_port_to_grpc_server, "original", serve_replica.add_port_to_grpc_server)
    serve_replica.add_port_to_grpc_server = original   # upstream's, even if this process applied the patch before
    try:
        ip = patches.bind_serve_replica_grpc_to_node_ip()
        assert ip == ray.util.get_node_ip_address()
        bound = serve_replica.add_port_to_grpc_server
        assert bound is not original and bound.original is original
        server = _FakeGrpcServer()
        assert bound(server, "[::]:0") == 4242 and bound(server, "10.1.2.3:7") == 4242
        host = f"[{ip}]" if ":" in ip else ip
        assert server.addresses == [f"{host}:0", "10.1.2.3:7"]
        assert patches.bind_serve_replica_grpc_to_node_ip() == ip and serve_replica.add_port_to_grpc_server is bound
    finally:
        serve_replica.add_port_to_grpc_server = original


@pytest.mark.parametrize("use", INTERNALS_USED, ids=lambda u: u.target)
def test_private_apis_read_elsewhere_still_resolve(use):
    try:
        resolve(use.target)
    except (ImportError, AttributeError) as exc:
        pytest.fail(f"{use.target} ({use.library}) is gone ({exc}); used by {use.where} for {use.why}")


def _third_party(module: str) -> bool:
    root = module.split(".")[0]
    return bool(root) and root not in PROJECT and root not in sys.stdlib_module_names


def library_patches(source: str) -> list[tuple[int, str]]:
    """Assignments into a third-party module's namespace in ``source``: ``name.attr = ...`` / ``setattr(name, ...)``
    where ``name`` was imported from a third-party package, and ``importlib.import_module(...).attr = ...``."""
    tree = ast.parse(source)
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {(a.asname or a.name.split(".")[0]) for a in node.names if _third_party(a.name)}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and _third_party(node.module or ""):
            imported |= {(a.asname or a.name) for a in node.names}

    def root_of(expr):
        while isinstance(expr, ast.Attribute):
            expr = expr.value
        return expr

    def is_library(expr) -> bool:
        base = root_of(expr)
        if isinstance(base, ast.Name):
            return base.id in imported
        return (isinstance(base, ast.Call) and isinstance(base.func, ast.Attribute)
                and base.func.attr == "import_module")

    found = []
    for node in ast.walk(tree):
        targets = (node.targets if isinstance(node, ast.Assign)
                   else [node.target] if isinstance(node, (ast.AugAssign, ast.AnnAssign)) else [])
        for t in targets:
            if isinstance(t, ast.Attribute) and is_library(t.value):
                found.append((node.lineno, ast.unparse(t)))
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "setattr"
                and node.args and is_library(node.args[0])):
            found.append((node.lineno, ast.unparse(node)))
    return found


def test_the_scan_finds_the_patch_forms():
    """The scanner itself can fail: it flags each way a library has been patched in this code base."""
    src = ('import importlib\nimport deepspeed\nfrom ray.serve._private import replica as serve_replica\n'
           'importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None\n'
           'serve_replica.add_port_to_grpc_server = print\ndeepspeed.comm.x = 1\nsetattr(serve_replica, "y", 2)\n'
           'from actors.cluster import patches\npatches.FLAG = 1\nclass A:\n    pass\nA.b = 1\n')
    assert [line for line, _ in library_patches(src)] == [4, 5, 6, 7]


def test_no_library_is_patched_outside_the_patches_module():
    offenders = []
    for folder in ("actors", "rl", "configs", "launch", "backbone", "rewards"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            if path == ROOT / "actors" / "cluster" / "patches.py":
                continue
            for line, what in library_patches(path.read_text()):
                offenders.append(f"{path.relative_to(ROOT)}:{line}: {what}")
    assert not offenders, "library internals patched outside actors/cluster/patches.py:\n" + "\n".join(offenders)
