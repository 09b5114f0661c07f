"""Run a child process under a hard memory limit, with a cgroup (v2 or v1) the kernel enforces.

Needs root (or a delegated cgroup). The limit covers the child's anonymous memory and its page
cache; the kernel reclaims cache under the limit and kills the child (SIGKILL) when it cannot.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from pathlib import Path

V2 = Path("/sys/fs/cgroup")
V1 = Path("/sys/fs/cgroup/memory")


@contextlib.contextmanager
def memory_cgroup(limit_bytes: int):
    """Yield a preexec_fn that moves the child into a fresh cgroup limited to `limit_bytes`."""
    name = f"lorafuse-bench-{uuid.uuid4().hex[:8]}"
    if (V2 / "cgroup.controllers").exists() and "memory" in (V2 / "cgroup.subtree_control").read_text():
        group, limit_file, swap_file = V2 / name, "memory.max", "memory.swap.max"
    elif V1.is_dir():
        group, limit_file, swap_file = V1 / name, "memory.limit_in_bytes", "memory.memsw.limit_in_bytes"
    else:
        raise RuntimeError("no writable memory cgroup found: run as root on Linux with cgroups")
    group.mkdir()
    try:
        (group / limit_file).write_text(str(limit_bytes))
        with contextlib.suppress(OSError):  # no swap accounting: the machine has no swap to escape to
            (group / swap_file).write_text(str(limit_bytes) if "memsw" in swap_file else "0")
        procs = str(group / "cgroup.procs")

        def enter() -> None:
            with open(procs, "w") as f:
                f.write(str(os.getpid()))

        yield enter
    finally:
        with contextlib.suppress(OSError):
            group.rmdir()
