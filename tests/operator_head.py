"""Helpers of tests/test_operator_clients.py: the README's cluster lines run as written on a private head (own
HOME, temp dir and ports), a real Prometheus on Ray's generated scrape config, listening sockets, Grafana's variable
substitution. Everything started here is stopped by its own handle (never `ray stop`, never a broad kill)."""
from __future__ import annotations

import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VENV = Path(sys.executable).parent.parent
README = REPO / "README.md"
DASHBOARD = REPO / "dashboards" / "grafana_grpo.json"


def free_ports(n: int) -> list[int]:
    """``n`` distinct free TCP ports on 127.0.0.1."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def readme_block(after: str) -> list[str]:
    """The lines (continuations joined, comments dropped) of the first code block after the README text ``after``."""
    text = README.read_text()
    block = text.split(after, 1)[1].split("```", 2)[1]
    lines = block.replace("\\\n", " ").splitlines()[1:]
    out = []
    for line in lines:
        line = re.sub(r"\s+#\s.*$", "", line).strip()
        if line:
            out.append(re.sub(r"\s+", " ", line))
    return out


def cluster_lines() -> dict[str, list[str] | str]:
    """The README's "Start Ray and submit the job" block: ``head`` (every line before the first submit) and
    ``submit`` (the first `ray job submit` line)."""
    lines = readme_block("**Start Ray and submit the job.**")
    first = next(i for i, x in enumerate(lines) if "ray job submit" in x)
    return {"head": lines[:first], "submit": lines[first]}


def clean_env(home: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    """The caller's environment without the project's venv on PATH, with a private HOME (so ``~/.ray/auth_token``
    is the test's own)."""
    venv = str(VENV)
    path = [p for p in os.environ.get("PATH", "").split(os.pathsep) if p and not p.startswith(venv)
            and ".venv" not in p]
    drop = ("RAY_ADDRESS", "VIRTUAL_ENV", "PYTHONPATH", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH",
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(PATH=os.pathsep.join(path), HOME=str(home), RAY_USAGE_STATS_ENABLED="0", **(extra or {}))
    return env


def with_venv(line: str) -> str:
    """A README line with ``$PWD/.venv`` pointing at this interpreter's environment."""
    return line.replace("$PWD/.venv", shlex.quote(str(VENV)))


def processes_under(marker: str) -> list[int]:
    """PIDs whose command line mentions ``marker`` (the head's private temp dir)."""
    import psutil

    pids = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            if any(marker in part for part in proc.info["cmdline"] or ()):
                pids.append(proc.info["pid"])
        except psutil.Error:
            continue
    return [p for p in pids if p != os.getpid()]


def stop_group(proc: subprocess.Popen, timeout: float = 30.0) -> None:
    """SIGTERM the process (started with ``start_new_session``) and its group, SIGKILL after ``timeout``."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


def stop_head(head: subprocess.Popen, temp_dir: str) -> None:
    """SIGTERM the blocking `ray start` alone (it drains the node and tears its cluster down, which needs its GCS
    alive), then anything of ours still alive."""
    if head.poll() is None:
        head.send_signal(signal.SIGTERM)
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pass
    stop_group(head, timeout=10.0)
    for sig, pause in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 0.0)):
        for pid in processes_under(temp_dir):
            try:
                os.kill(pid, sig)
            except (ProcessLookupError, PermissionError):
                pass
        time.sleep(pause)


def http(url: str, headers: dict | None = None, data: bytes | None = None, timeout: float = 10.0):
    """(status, body bytes, response headers) of one request; HTTP errors are returned, not raised."""
    req = urllib.request.Request(url, data=data, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read(), r.headers
    except urllib.error.HTTPError as e:
        return e.code, e.read(), e.headers


def wait_http(url: str, timeout: float, ok=lambda status: True, proc: subprocess.Popen | None = None) -> int:
    """Poll ``url`` until it answers with a status ``ok`` accepts; returns that status."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"{proc.args!r} exited with {proc.returncode} before {url} answered")
        try:
            status = http(url, timeout=3.0)[0]
            if ok(status):
                return status
        except OSError:
            pass
        time.sleep(1.0)
    raise AssertionError(f"{url} did not answer within {timeout:.0f} s")


def start_prometheus(config: Path, port: int, data_dir: Path, log: Path) -> subprocess.Popen:
    """Debian's Prometheus on 127.0.0.1:``port`` with ``config`` (fails, never skips, without the binary)."""
    import shutil

    binary = shutil.which("prometheus") or ("/usr/bin/prometheus" if Path("/usr/bin/prometheus").exists() else None)
    assert binary, "the prometheus binary is missing: apt-get install -y prometheus (.ci/run installs it)"
    proc = subprocess.Popen([binary, f"--config.file={config}", f"--storage.tsdb.path={data_dir}",
                             f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
                            stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    wait_http(f"http://127.0.0.1:{port}/-/ready", 60, ok=lambda s: s == 200, proc=proc)
    return proc


def prom_api(port: int, path: str, **params) -> dict:
    """GET Prometheus' HTTP API ``/api/v1/<path>``; the decoded JSON (status "success" asserted)."""
    query = urllib.parse.urlencode(params, doseq=True)
    status, body, _ = http(f"http://127.0.0.1:{port}/api/v1/{path}?{query}", timeout=30.0)
    out = json.loads(body)
    assert status == 200 and out.get("status") == "success", (path, params, status, body[:500])
    return out


def grafana_regex_value(value: str) -> str:
    """A value of a multi-value / include-all variable as Grafana's Prometheus data source interpolates it into a
    query (``prometheusSpecialRegexEscape``: backslash and regex metacharacters escaped, doubled for PromQL)."""
    value = value.replace("\\", "\\\\\\\\")
    return re.sub(r"([$^*{}\[\]'+?.()|])", r"\\\\\1", value)


def substitute(expr: str, variables: dict[str, str]) -> str:
    """``$name`` / ``${name}`` of the dashboard's variables replaced by their (already interpolated) values."""
    for name in sorted(variables, key=len, reverse=True):
        expr = expr.replace("${" + name + "}", variables[name]).replace("$" + name, variables[name])
    assert "$" not in expr.replace("$__", ""), expr
    return expr


def dashboard_queries() -> list[tuple[str, str, str]]:
    """(panel title, refId, expr) of every target of the shipped dashboard."""
    dash = json.loads(DASHBOARD.read_text())
    return [(p["title"], t["refId"], t["expr"]) for p in dash["panels"] for t in p["targets"]]


def tree_pids(root_pid: int) -> set[int]:
    """``root_pid`` and all its descendants."""
    import psutil

    root = psutil.Process(root_pid)
    return {root_pid, *(p.pid for p in root.children(recursive=True))}


def ss_listing(pids: set[int]) -> list[str]:
    """`ss -ltnp` lines (LISTEN, TCP) of the processes ``pids``."""
    out = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True, check=True).stdout
    keep = []
    for line in out.splitlines():
        found = {int(p) for p in re.findall(r"pid=(\d+)", line)}
        if found & pids:
            keep.append(re.sub(r"\s+", " ", line.strip()))
    return keep


def ss_address(line: str) -> str:
    """The local address of one `ss -ltnH` line (``*`` and brackets kept as ss prints them)."""
    local = line.split()[3]
    return local.rsplit(":", 1)[0].strip("[]")
