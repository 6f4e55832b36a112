"""A tf.distribute cluster of subprocesses on loopback, for the distributed tests.

Each task is ``python -m <module> ...`` with its own ``TF_CONFIG``; the
worktree is on every subprocess's path. ``run_cluster`` waits (bounded) for
the tasks that must finish and kills the rest (parameter-server ``worker`` /
``ps`` tasks serve until killed).
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def free_ports(n: int) -> list[int]:
    """n distinct free TCP ports on 127.0.0.1 (held open together while picked)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def cluster(**counts: int) -> dict:
    """{"worker": ["127.0.0.1:p", ...], ...} with fresh ports per task."""
    ports = iter(free_ports(sum(counts.values())))
    return {kind: [f"127.0.0.1:{next(ports)}" for _ in range(n)] for kind, n in counts.items()}


def start(spec: dict, kind: str, index: int, args: list[str], log: Path) -> subprocess.Popen:
    env = dict(os.environ, TF_CONFIG=json.dumps({"cluster": spec,
                                                 "task": {"type": kind, "index": index}}),
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
               TF_USE_LEGACY_KERAS="1", TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="")
    out = open(log, "w")
    return subprocess.Popen([sys.executable, *args], cwd=ROOT, env=env, stdout=out,
                            stderr=subprocess.STDOUT)


def run_cluster(spec: dict, args_of, finish: list[tuple[str, int]], logs: Path,
                timeout: float = 300) -> dict:
    """Start every task of ``spec`` (``args_of(kind, index)`` -> python args), wait
    for the ``finish`` tasks, then stop the others; {(kind, index): returncode}.
    Raises AssertionError with the failing task's log tail."""
    procs = {(k, i): start(spec, k, i, args_of(k, i), logs / f"{k}{i}.log")
             for k, addrs in spec.items() for i in range(len(addrs))}
    codes = {}
    try:
        for task in finish:
            try:
                codes[task] = procs[task].wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                codes[task] = None
    finally:
        for task, p in procs.items():
            if p.poll() is None:
                p.kill()
                p.wait()
    bad = [t for t in finish if codes[t] != 0]
    if bad:
        tails = "\n".join(f"--- {k}{i} (rc {codes[(k, i)]}):\n"
                          + (logs / f"{k}{i}.log").read_text()[-3000:] for k, i in bad)
        raise AssertionError(f"tasks failed: {bad}\n{tails}")
    return codes
