"""The command's fixed cost: time from start to its first output byte, to its end, and its CPU seconds.

    python benchmarks/start_cost.py BASE ADAPTER [--rounds 10] [--tree NAME=SRC ...] [-- EXTRA MERGE ARGS]

Each round runs `lorafuse merge BASE ADAPTER OUT` once per tree (the lorafuse sources put first on
PYTHONPATH; default: the installed one), in a rotating order, so that trees are compared under the same
load. The first byte is the first the command writes to stdout or stderr (the plan's first line, or with
--quiet the end); CPU is user + system of the command and its children. Medians and ranges are printed.
On a shared machine compare the CPU seconds and the interleaved medians, not single wall times.
"""

from __future__ import annotations

import argparse
import os
import selectors
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def run(command: list[str], env: dict[str, str]) -> dict:
    """One run: seconds to the first output byte and to the end, CPU seconds (user + system)."""
    start = time.perf_counter()
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    first = None
    with selectors.DefaultSelector() as selector:
        for stream in (proc.stdout, proc.stderr):
            selector.register(stream, selectors.EVENT_READ)
        while selector.get_map():
            for key, _ in selector.select():
                chunk = os.read(key.fileobj.fileno(), 65536)
                if chunk and first is None:
                    first = time.perf_counter() - start
                if not chunk:
                    selector.unregister(key.fileobj)
    _, status, usage = os.wait4(proc.pid, 0)
    done = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"{' '.join(command)} exited with status {os.waitstatus_to_exitcode(status)}")
    return {"first": first if first is not None else done, "done": done, "cpu": usage.ru_utime + usage.ru_stime}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("base")
    p.add_argument("adapter")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--tree", action="append", default=[], metavar="NAME=SRC",
                   help="a lorafuse source folder (the one holding lorafuse/ and lorafuse_command.py) to run")
    own, extra = (sys.argv[1:sys.argv.index("--")], sys.argv[sys.argv.index("--") + 1:]) if "--" in sys.argv \
        else (sys.argv[1:], [])
    args = p.parse_args(own)
    trees = dict(t.split("=", 1) for t in args.tree) or {"installed": ""}
    command = str(Path(sys.executable).with_name("lorafuse"))
    scratch = Path(tempfile.mkdtemp(prefix="lorafuse-start-"))
    samples: dict[str, list[dict]] = {name: [] for name in trees}
    try:
        for round_ in range(args.rounds):
            names = list(trees)
            k = round_ % len(names)
            for name in names[k:] + names[:k]:
                env = dict(os.environ)
                if trees[name]:
                    env["PYTHONPATH"] = os.pathsep.join(filter(None, [trees[name], env.get("PYTHONPATH")]))
                out = scratch / "out"
                shutil.rmtree(out, ignore_errors=True)
                samples[name].append(run([command, "merge", args.base, args.adapter, str(out), *extra], env))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print(f"{'tree':<12} {'first byte (s)':>22} {'done (s)':>22} {'CPU (s)':>22}")
    for name, runs in samples.items():
        cells = []
        for key in ("first", "done", "cpu"):
            values = [r[key] for r in runs]
            cells.append(f"{statistics.median(values):.3f} ({min(values):.3f}-{max(values):.3f})")
        print(f"{name:<12} " + " ".join(f"{c:>22}" for c in cells))


if __name__ == "__main__":
    main()
