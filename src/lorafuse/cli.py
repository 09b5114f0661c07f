"""The `lorafuse` command: arguments, progress and exit codes. No merge logic lives here.

Exit codes: 0 success, 2 bad usage or bad input (one line on stderr), 1 internal error, 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import traceback
import unicodedata

from .version import __version__
from .api import merge, plan as plan_merge
from .errors import LorafuseError, OutputComplete, require_torch
from .plan import describe, patch_label, room_problem
from .sinks.gguf.quantize import TYPES as QUANTIZER_TYPES
from .sources.hub import ADAPTER_CONFIG, resolve_adapter
from .units import human_size


def main(argv: list[str] | None = None) -> int:
    # One OpenBLAS thread, set before numpy loads: the pipeline threads are the parallelism (the Python
    # API gets the same from threadpoolctl, see compute.rows), and idle OpenBLAS threads spin on the cores.
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    outside = signal.getsignal(signal.SIGINT)  # the command's entry point ends the process at once: see lorafuse_command
    own = callable(outside) and outside is not signal.default_int_handler
    try:
        if own:  # while a command runs, Ctrl-C raises KeyboardInterrupt, so that cleanups run
            signal.signal(signal.SIGINT, signal.default_int_handler)
        args = _parser().parse_args(argv)
        return args.run(args)
    except LorafuseError as e:
        _tell(f"lorafuse: error: {_one_line(str(e))}")
        return 2
    except OutputComplete as e:
        _tell(f"lorafuse: interrupted after {e} was complete; the merge is done")
        return 130
    except KeyboardInterrupt:
        _tell("lorafuse: interrupted; the output folder was not touched, and running the same command again "
              "continues from the last finished shard")
        return 130
    except _ReaderGone:
        return 0
    except Exception:
        _tell(traceback.format_exc() + "lorafuse: internal error (a bug): please report it with the trace above")
        return 1
    finally:
        _flush_stdout()
        if own:
            signal.signal(signal.SIGINT, outside)


class _ReaderGone(Exception):
    """Whoever read stdout has closed it (`lorafuse inspect ... | head -1`): a normal end, not an error."""


def _say(text: str) -> None:
    """Print a result on stdout, flushed at once, so that a closed pipe shows up here and nowhere else. With
    stdout closed from the start (`>&-`, sys.stdout None) there is no one to tell: the command carries on."""
    if sys.stdout is None:
        return
    try:
        print(text, flush=True)
    except BrokenPipeError:
        _discard(sys.stdout)
        raise _ReaderGone from None


def _tell(text: str) -> None:
    """Print a message on stderr. Once its reader has gone (`2>&1 | head -1`), or when stderr was closed
    from the start (`2>&-`), the command carries on unheard: a merge is not given up for a log nobody reads."""
    if sys.stderr is None:
        return
    try:
        print(text, file=sys.stderr, flush=True)
    except BrokenPipeError:
        _discard(sys.stderr)


def _one_line(text: str) -> str:
    """The text with its control characters and line separators written as escapes (a newline as the two
    characters \\n): an error names paths and file names that anyone may have chosen, and one with a newline
    in it would split the one-line error, or forge a line of its own (`lorafuse: done OK`)."""
    return "".join(c.encode("unicode_escape").decode("ascii") if unicodedata.category(c) in ("Cc", "Zl", "Zp") else c
                   for c in text)


def _flush_stdout() -> None:
    """What argparse (--help, --version) or anyone else left in stdout's buffer."""
    if sys.stdout is None:
        return
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        _discard(sys.stdout)


def _discard(stream) -> None:
    """Point a closed pipe's stream at /dev/null, so that later writes and the interpreter's flush at exit
    do not fail on it again (Python's recipe: "Note on SIGPIPE" in the signal module's documentation)."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, stream.fileno())
    os.close(devnull)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lorafuse", description="Merge LoRA adapters into their base models, one tensor at a time.")
    parser.add_argument("--version", action="version", version=f"lorafuse {__version__}")
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    m = commands.add_parser("merge", help="merge ADAPTER into BASE (or several adapters, weighted) and write a standalone "
                            "model to OUT", usage="lorafuse merge [options] [BASE] ADAPTER OUT\n"
                            "       lorafuse merge [options] BASE ADAPTER1 ADAPTER2 ... OUT [--weights W1,W2,...]")
    _inputs(m, "[BASE] ADAPTER... OUT", {3: ("base", "adapter", "out"), 2: ("adapter", "out")},
            ["merged_16bit", "merged_4bit", "lora"], "merged_4bit re-quantizes the merged linear weights to "
            "bitsandbytes NF4 (loses precision); lora writes the adapter alone, checked against BASE: a LoRA GGUF "
            "for llama.cpp's --lora when OUT ends in .gguf, else a PEFT folder")
    m.add_argument("--device", default="cpu", help="where the delta arithmetic runs: cpu (default) or cuda")
    m.add_argument("--force", action="store_true", help="replace OUT if it exists")
    m.add_argument("--llama-cpp", metavar="DIR", help="with a .gguf OUT: the llama.cpp checkout whose converter writes "
                   "it, and whose build/bin/llama-quantize quantizes it (default: LLAMA_CPP_DIR, else a pinned copy of "
                   "the converter fetched from PyPI once)")
    m.add_argument("--resume", action="store_true",
                   help="insist on continuing an interrupted run of this merge (a rerun continues one anyway)")
    m.add_argument("--low-disk", action="store_true",
                   help="download base shards the cache lacks next to OUT and delete each once merged (the cache is "
                        "not filled); with --push-to-hub, also delete each output shard once uploaded")
    m.add_argument("--push-to-hub", metavar="REPO", help="upload each shard as it is finished and publish OUT as one commit to REPO")
    m.add_argument("--private", action="store_true", help="with --push-to-hub: create REPO private")
    m.add_argument("--revision", metavar="BRANCH", help="with --push-to-hub: commit to BRANCH (created if missing)")
    m.add_argument("--commit-message", help="with --push-to-hub: the commit's message")
    m.add_argument("--quiet", action="store_true", help="print nothing but errors")
    m.add_argument("--json", action="store_true", help="print the report as JSON")
    m.set_defaults(run=_merge)

    p = commands.add_parser("plan", help="dry run: what a merge would do and cost; no base shard is downloaded, nothing is written to OUT",
                            usage="lorafuse plan [options] [BASE] ADAPTER [OUT]\n"
                            "       lorafuse plan [options] BASE ADAPTER1 ADAPTER2 ... OUT\n"
                            "       lorafuse plan [options] BASE ADAPTER1 ADAPTER2 ... --weights W1,W2,...")
    _inputs(p, "[BASE] ADAPTER... [OUT]", {3: ("base", "adapter", "out"), 2: ("base", "adapter"), 1: ("adapter",)},
            ["merged_16bit", "merged_4bit"], "merged_4bit re-quantizes the merged linear weights to bitsandbytes NF4 "
            "(loses precision)")
    p.add_argument("--verbose", "-v", action="store_true", help="list every changed tensor")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.set_defaults(run=_plan)

    i = commands.add_parser("inspect", help="per changed weight: the adapter's delta, and the gap to another base (QLoRA)",
                            usage="lorafuse inspect [options] [BASE] ADAPTER")
    i.add_argument("paths", nargs="+", metavar="[BASE] ADAPTER")
    i.set_defaults(shapes={2: ("base", "adapter"), 1: ("adapter",)})
    i.add_argument("--compare-base", metavar="OTHER", help="another version of the base (e.g. the 4-bit one the adapter was trained on)")
    i.add_argument("--json", action="store_true", help="print the rows as JSON")
    i.set_defaults(run=_inspect)

    v = commands.add_parser("verify", help="check a merged folder: manifest hashes, headers, index, NaN/Inf, and a recomputed sample")
    v.add_argument("out", metavar="OUT")
    v.add_argument("--base", help="the base it was merged from: recompute merged tensors (see --sample)")
    v.add_argument("--adapter", action="append", help="the adapter it was merged from (repeated, in order, for several)")
    v.add_argument("--sample", default="8", metavar="N|all",
                   help="with --base/--adapter: merged tensors to recompute, and untouched ones to compare with the "
                        "base (default 8 each, spread over the model); all: every one")
    v.set_defaults(run=_verify)

    d = commands.add_parser("demo", help="build a tiny base and adapter, merge them, check the result")
    d.add_argument("--keep", metavar="DIR", help="keep the demo's files in DIR")
    d.set_defaults(run=_demo)
    return parser


def _inputs(p: argparse.ArgumentParser, metavar: str, shapes: dict, save_methods: list[str], save_help: str) -> None:
    p.add_argument("paths", nargs="+", metavar=metavar,
                   help="BASE and ADAPTER: folders or Hugging Face repo ids org/name[@revision]; "
                        "without BASE, the base the adapter names. Several adapters: BASE, the adapters, OUT")
    p.add_argument("--weights", metavar="W1,W2,...",
                   help="one weight per adapter, in order (default 1 each): OUT is the base plus the weighted sum of "
                        "the adapters' deltas; a first weight below 0 is written --weights=-0.5,1")
    p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp16", "fp32"], help="output dtype (default: as the base)")
    p.add_argument("--max-shard-size", help="largest output shard, e.g. 5GB or 500MB (default 5GB); with a .gguf "
                   "OUT, split it into llama.cpp's split files of this size (default one file)")
    p.add_argument("--gguf-type", default="auto", metavar="TYPE",
                   help="with an OUT ending in .gguf: auto (the base's 16-bit type; with --save-method lora, the "
                        "adapter's, f16 for fp32), f32, f16, bf16, q8_0 (written by llama.cpp's converter), or a type "
                        "of llama.cpp's quantizer (llama-quantize, else llama-cpp-python): "
                        f"{', '.join(QUANTIZER_TYPES)}")
    p.add_argument("--save-method", default="merged_16bit", choices=save_methods, help=save_help)
    p.set_defaults(shapes=shapes)


def _positional(args) -> None:
    """Name the positional paths by their count: BASE may be left out when the adapter names it. merge and
    plan take several adapters: BASE, the adapters, then OUT. plan's OUT is optional, so there a --weights
    that lists several weights says how many adapters there are, and the last path is OUT only beyond them."""
    paths = args.paths
    args.base = args.out = None
    args.weights = _weights(args.weights) if getattr(args, "weights", None) is not None else None
    count = len(args.weights or ())
    if count > 1:
        planning = args.run is _plan
        if len(paths) != count + 2 and not (planning and len(paths) == count + 1):
            raise LorafuseError(f"--weights lists {count} weights, so {'plan' if planning else 'merge'} takes BASE, "
                                f"{count} adapters and {'optionally ' if planning else ''}OUT: got {len(paths)} paths")
        args.base, args.adapters, args.out = paths[0], paths[1:count + 1], (paths[count + 1:] or [None])[0]
    elif args.run in (_plan, _merge) and len(paths) > 3:
        args.base, args.adapters, args.out = paths[0], paths[1:-1], paths[-1]
    else:
        fields = args.shapes.get(len(paths))
        if fields is None:
            counts = f"at least {min(args.shapes)}" if args.run in (_plan, _merge) else " or ".join(map(str, sorted(args.shapes)))
            raise LorafuseError(f"expected {counts} paths, got {len(paths)}; see --help")
        for name, value in zip(fields, paths):
            setattr(args, name, value)
        args.adapters = [args.adapter]


def _weights(text: str) -> list[float]:
    """--weights as numbers (their count and finiteness are checked with the adapters)."""
    try:
        return [float(part) for part in text.split(",")]
    except ValueError:
        raise LorafuseError(f"--weights {text!r} is not a list of numbers; write one per adapter, separated by commas: "
                            "--weights 0.7,0.3") from None


def _plan(args) -> int:
    _positional(args)
    if args.out is not None and os.path.isfile(os.path.join(args.out, ADAPTER_CONFIG)):
        raise LorafuseError(f"OUT {args.out} is a PEFT adapter: to plan several adapters without OUT, give their weights "
                            "(lorafuse plan BASE ADAPTER1 ADAPTER2 --weights 1,1), so that the paths can be told apart")
    _show_cache_status(args)
    plan = plan_merge(args.base, args.adapters, args.out, dtype=args.dtype, max_shard_size=args.max_shard_size,
                      save_method=args.save_method, weights=args.weights, gguf_type=args.gguf_type)
    problem = room_problem(plan)
    if args.json:
        _say(json.dumps({**_plan_dict(plan), "fits": None if args.out is None else problem is None}, indent=2))
    else:
        _say("\n".join(describe(plan, verbose=args.verbose)))
    if problem:  # after the plan, which says what each mode needs
        raise LorafuseError(problem)
    return 0


def _show_cache_status(args) -> None:
    """For inputs named by repo id: what is cached and what a merge would download. The plan itself then
    fetches only the small files (config, index, tokenizer, the adapter) and reads shard headers by range
    requests: no base shard is downloaded."""
    from .sources.hub import base_from_adapter, cache_status, describe_status, parse_spec

    for spec, kind in [*((adapter, "adapter") for adapter in args.adapters), (args.base, "model")]:
        if spec is None:
            spec = base_from_adapter(resolve_adapter(args.adapter))
            if spec is None:
                return  # the plan says what is wrong
        if parse_spec(spec) is None:
            continue
        status = cache_status(spec, kind=kind)
        line = f"{'adapter' if kind == 'adapter' else 'base':<8} {describe_status(status)}"
        if args.json:
            _tell(line)
        else:
            _say(line)


def _plan_dict(plan) -> dict:
    output = {"gguf": plan.file_output.to_dict()} if plan.file_output else {
        "shards": [{"file": s.filename, "bytes": s.size, "tensors": len(s.tensors)} for s in plan.shards]}
    return {
        **output,
        "adapters": [{"adapter": name, "weight": weight} for name, weight in zip(plan.adapter_names, plan.weights)],
        "changed": {t.name: [patch_label(plan, p) for p in t.patches] for t in plan.merged},
        "copied": sum(t.is_copy for t in plan.tensors),
        "output_bytes": plan.output_bytes,
        "peak_memory": plan.peak_memory,
        "pipeline_depth": plan.depth,
        "disk_free": plan.disk_free,
        "download_bytes": plan.base.download_bytes,
        "disk_needs": {mode: dict(zip(("out", "cache"), plan.disk_needs(low_disk=low, pushing=push)))
                       for mode, low, push in (("default", False, False), ("low_disk", True, False),
                                               ("low_disk_push", True, True))},
        "config": plan.config,
        "notes": plan.notes,
    }


def _merge(args) -> int:
    """A Ctrl-C once merge() has returned (OUT is complete) is told as such, as one inside it is."""
    merged = []  # CPython raises a pending Ctrl-C at calls and loops: before merge() returns or after the append
    try:
        return _run_merge(args, merged)
    except KeyboardInterrupt as e:
        if merged and not isinstance(e, OutputComplete):
            raise OutputComplete(merged[0].out) from None
        raise


def _run_merge(args, merged: list) -> int:
    _positional(args)
    show = not args.quiet and not args.json
    bar = None

    def on_plan(plan) -> None:
        nonlocal bar
        if show:
            _tell("\n".join(describe(plan)))
            bar = _progress(plan.total_size, len(plan.tensors))

    try:
        report = merge(args.base, args.adapters, args.out, weights=args.weights, dtype=args.dtype,
                       max_shard_size=args.max_shard_size, save_method=args.save_method,
                       device=args.device, force=args.force, resume=args.resume, push_to_hub=args.push_to_hub,
                       private=args.private, revision=args.revision, commit_message=args.commit_message,
                       low_disk=args.low_disk, gguf_type=args.gguf_type, llama_cpp=args.llama_cpp,
                       on_plan=on_plan, on_progress=(lambda n: bar.update(n)) if show else None)
        merged.append(report)
    finally:
        if bar is not None:
            bar.close()
    if args.json:
        _say(json.dumps(report.to_dict(), indent=2))
    elif show and args.save_method == "lora":
        _tell(f"done     {report.out}: the adapter's {report.tensors_copied} tensors, {human_size(report.bytes_written)} "
              f"in {report.seconds:.1f} s")
    elif show:
        _tell(
            f"done     {report.out}: {report.tensors_merged} merged, {report.tensors_copied} copied, "
            f"{report.tensors_cast} cast, {human_size(report.bytes_written)} in {report.seconds:.1f} s, "
            f"peak memory {human_size(report.peak_memory)}" + (f"; published {report.hub_url}" if report.hub_url else "")
            + (" (the shards are on the Hub only: --low-disk)" if report.hub_url and args.low_disk else "")
        )
    return 0


class _progress:
    """A tqdm bar (bytes, tensors, rate, time left) on a terminal; a plain line every 10% otherwise. Sizes in
    decimal units (kB = 1000 B), as the plan and the report write them (units.human_size)."""

    def __init__(self, total: int, tensors: int) -> None:
        self.total, self.tensors, self.done, self.count, self.next_tenth = total, tensors, 0, 0, 1
        self.bar = None
        if sys.stderr is not None and sys.stderr.isatty():  # None: closed from the start (`2>&-`)
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1000, desc="merging", file=sys.stderr)

    def update(self, n: int) -> None:
        self.done += n
        self.count += 1
        if self.bar is not None:
            self.bar.set_postfix_str(f"{self.count}/{self.tensors} tensors", refresh=False)
            self.bar.update(n)
        elif self.total and self.done * 10 // self.total >= self.next_tenth and (self.done < self.total or self.count == self.tensors):
            _tell(f"progress {self.done / self.total:4.0%}  {human_size(self.done)} / {human_size(self.total)}, "
                  f"{self.count}/{self.tensors} tensors")
            self.next_tenth = self.done * 10 // self.total + 1

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _inspect(args) -> int:
    from dataclasses import asdict

    _positional(args)
    require_torch("lorafuse inspect")
    from .tools.inspection import describe as describe_rows
    from .tools.inspection import inspect

    rows = inspect(args.base, args.adapter, args.compare_base)
    _say(json.dumps([asdict(r) for r in rows], indent=2) if args.json else "\n".join(describe_rows(rows)))
    return 0


def _verify(args) -> int:
    if not args.out:
        raise LorafuseError("the folder to verify is empty; name it: lorafuse verify OUT")
    require_torch("lorafuse verify")
    from .tools.verify import verify

    verdict = verify(args.out, args.base, args.adapter, args.sample)
    for problem in verdict:
        _tell(f"problem  {_one_line(problem)}")
    if verdict:
        raise LorafuseError(f"{args.out} failed verification with {len(verdict)} problem(s), listed above")
    line = f"ok       {args.out}: manifest, headers, index and values check out"
    if args.base:  # how much was recomputed, so that a spot check never reads as a full check
        (merged, of_merged), (alone, of_alone) = verdict.recomputed, verdict.compared
        line += (f"; files, config and model card are this merge's; {merged} of {of_merged} merged tensors "
                 f"recomputed from base and adapter agree, {alone} of {of_alone} untouched tensors equal the base's")
        if merged < of_merged or alone < of_alone:
            line += " (a sample: --sample all checks every one)"
        if verdict.requantized:
            line += f"; {verdict.requantized} re-quantized to NF4 are checked by their hashes only"
    _say(line)
    return 0


def _demo(args) -> int:
    from .tools.demo import run_demo

    return run_demo(args.keep, say=_say)


if __name__ == "__main__":
    sys.exit(main())
