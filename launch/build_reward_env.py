"""Build (or check) the Python environment of a reward expert that needs its own packages.

    python -m launch.build_reward_env unipercept            # -> .venv-unipercept/ (skipped when up to date)
    python -m launch.build_reward_env unipercept --force    # rebuild from scratch
    python -m launch.build_reward_env unipercept --check    # only check an existing one
    python -m launch.build_reward_env unipercept --dest /shared/envs/unipercept

The environment is an *overlay* (see :mod:`rewards.expert_env`): a venv of the project interpreter's base Python
holding only the exact pins of ``envs/<name>/requirements.lock`` (installed with ``--no-deps``, wheels only), plus
one ``.pth`` line that appends the project interpreter's site-packages. Nothing else is downloaded: torch and the
rest come from the project. Prints the build time and the size, then ``NAME: VALUE`` lines.

Multi-node: Ray starts the expert's replicas with this interpreter by path, so the environment must exist at the
same path on every node that may host a replica (build it on each node, or on a shared filesystem, with the same
project interpreter path). The alternative, Ray's own ``runtime_env`` ``pip`` field, is described in the README.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

from rewards.expert_env import MARKER, ExpertEnvError, check_python, default_dest, lock_digest, lock_path, read_lock

__all__ = ["build_env", "env_python", "main"]

PTH_NAME = "_unictask_project.pth"


def env_python(dest: Path) -> Path:
    """The interpreter of an environment rooted at ``dest``."""
    return Path(dest) / "bin" / "python"


def _site_packages(python: Path) -> Path:
    out = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                         capture_output=True, text=True, check=True)
    return Path(out.stdout.strip())


def _size_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file() and not p.is_symlink())


def build_env(name: str, dest: str | Path | None = None, force: bool = False, log=print) -> dict:
    """Build environment ``name`` at ``dest`` (default ``<repo>/.venv-<name>``); returns its marker dict.

    An existing environment that passes :func:`rewards.expert_env.check_python` is kept unless ``force``. The
    build happens in ``<dest>.building`` and is renamed into place, so a failed build never leaves a half
    environment at ``dest``.
    """
    pins = read_lock(name)               # bad lock -> error before anything is written
    dest = Path(dest) if dest else default_dest(name)
    dest = dest if dest.is_absolute() else Path.cwd() / dest
    if env_python(dest).exists() and not force:
        try:
            check_python(env_python(dest), name)
            info = json.loads((dest / MARKER).read_text())
            log(f"{name}: environment at {dest} is up to date (use --force to rebuild)")
            return info
        except (ExpertEnvError, OSError, ValueError) as exc:
            log(f"{name}: rebuilding: {exc}")
    work = dest.with_name(dest.name + ".building")
    shutil.rmtree(work, ignore_errors=True)
    t0 = time.monotonic()
    try:
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(work)], check=True)
        site = _site_packages(env_python(work))
        project_sites = sorted({sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]})
        (site / PTH_NAME).write_text("".join(f"import site; site.addsitedir({p!r})\n" for p in project_sites))
        cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--only-binary=:all:", "--no-input",
               "--disable-pip-version-check", "--target", str(site), "-r", str(lock_path(name))]
        log(f"{name}: installing {len(pins)} pinned packages: " + " ".join(f"{k}=={v}" for k, v in pins.items()))
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{name}: pip failed ({' '.join(cmd)}):\n{proc.stderr.strip()[-2000:]}")
        shutil.rmtree(site / "bin", ignore_errors=True)   # pip --target puts console scripts here; unused
        info = {"env": name, "lock_sha256": lock_digest(name), "python": sys.version.split()[0],
                "base_interpreter": sys.executable, "project_site_packages": project_sites,
                "build_s": round(time.monotonic() - t0, 1), "size_mb": round(_size_bytes(work) / 2**20, 1)}
        (work / MARKER).write_text(json.dumps(info, indent=2) + "\n")
        if dest.exists():
            shutil.rmtree(dest)
        work.rename(dest)
        _fix_paths(dest, work)
        check_python(env_python(dest), name)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    log(f"{name}: built {dest} in {info['build_s']}s, {info['size_mb']} MB")
    return info


def _fix_paths(dest: Path, work: Path) -> None:
    """venv writes its own path into pyvenv.cfg and the activate scripts; point them at the final location."""
    for f in [dest / "pyvenv.cfg", *(dest / "bin").glob("activate*")]:
        if f.is_file():
            f.write_text(f.read_text().replace(str(work), str(dest)))


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point (see the module docstring)."""
    ap = argparse.ArgumentParser(prog="python -m launch.build_reward_env", description=__doc__.split("\n")[0])
    ap.add_argument("name", help="environment under envs/ (e.g. unipercept)")
    ap.add_argument("--dest", default=None, help="where to build it (default: <repo>/.venv-<name>)")
    ap.add_argument("--force", action="store_true", help="rebuild even when the environment is up to date")
    ap.add_argument("--check", action="store_true", help="only check an existing environment")
    args = ap.parse_args(argv)
    try:
        dest = Path(args.dest) if args.dest else default_dest(args.name)
        if args.check:
            found = check_python(env_python(dest.absolute()), args.name)
            print(f"{args.name}: {dest} OK ({json.dumps(found['versions'])})")
            return 0
        info = build_env(args.name, dest, force=args.force)
    except (ValueError, ExpertEnvError, RuntimeError, subprocess.CalledProcessError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"ENV_BUILD_S: {info['build_s']}")
    print(f"ENV_SIZE_MB: {info['size_mb']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
