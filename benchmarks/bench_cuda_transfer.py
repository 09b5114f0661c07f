"""One tensor's round trip through the GPU, the ways --device cuda could do it (needs a CUDA GPU).

A merge on the GPU reads a 16-bit tensor into host memory, moves it to the GPU, widens it to fp32, adds
s·B@A, rounds it back to 16 bits and moves it home to be written. Where the conversions happen decides
how many bytes cross the bus and what the CPU does meanwhile:

- ``convert-in-copy``: ``x.to(cuda, float32)`` and ``host16.copy_(gpu32)``: torch converts a copy between
  devices on the CPU, into a temporary (lorafuse before session 5);
- ``convert-on-gpu``: ``x.to(cuda).float()`` and ``host16.copy_(gpu32.to(bfloat16))``: 16-bit bytes on
  the bus, conversions on the GPU (lorafuse now);
- ``pinned``: the same from and to page-locked host buffers;
- ``cpu``: the CPU's own fp32 path (torch, all cores), for scale.

    python benchmarks/bench_cuda_transfer.py [--rows 5632 --cols 2048 --rank 16 --repeats 30]

Prints the median and spread of each, in ms, and GB/s of 16-bit tensor moved.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def convert_in_copy(host_in, host_out, a, b, scale):
    value = host_in.to("cuda", torch.float32)
    value.addmm_(b, a, alpha=scale)
    host_out.copy_(value)


def convert_on_gpu(host_in, host_out, a, b, scale):
    value = host_in.to("cuda").to(torch.float32)
    value.addmm_(b, a, alpha=scale)
    host_out.copy_(value.to(host_out.dtype))


def on_cpu(host_in, host_out, a, b, scale, fp32):
    value = fp32.copy_(host_in)
    value.addmm_(b, a, alpha=scale)
    host_out.copy_(value)


def timed(fn, args, repeats: int) -> list[float]:
    fn(*args)  # warm-up: kernels loaded, allocator primed
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(*args)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=5632)
    p.add_argument("--cols", type=int, default=2048)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--repeats", type=int, default=30)
    args = p.parse_args()
    rows, cols, r = args.rows, args.cols, args.rank
    torch.manual_seed(0)
    pageable_in = torch.randn(rows, cols).to(torch.bfloat16)
    pageable_out = torch.empty_like(pageable_in)
    pinned_in, pinned_out = pageable_in.pin_memory(), torch.empty_like(pageable_in).pin_memory()
    a_gpu, b_gpu = torch.randn(r, cols, device="cuda"), torch.randn(rows, r, device="cuda")
    a_cpu, b_cpu = a_gpu.cpu(), b_gpu.cpu()
    variants = {
        "convert-in-copy": (convert_in_copy, (pageable_in, pageable_out, a_gpu, b_gpu, 0.5)),
        "convert-on-gpu": (convert_on_gpu, (pageable_in, pageable_out, a_gpu, b_gpu, 0.5)),
        "pinned": (convert_on_gpu, (pinned_in, pinned_out, a_gpu, b_gpu, 0.5)),
        "cpu": (on_cpu, (pageable_in, pageable_out, a_cpu, b_cpu, 0.5, torch.empty(rows, cols))),
    }
    reference = None
    nbytes = pageable_in.numel() * 2
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, {torch.get_num_threads()} CPU threads; "
          f"tensor {rows}x{cols} bf16 ({nbytes / 1e6:.1f} MB), r={r}")
    print(f"{'variant':<16} {'median ms':>10} {'min-max ms':>14} {'GB/s':>7}")
    for name, (fn, fn_args) in variants.items():
        times = timed(fn, fn_args, args.repeats)
        out = fn_args[1].float()
        if reference is None:
            reference = out
        differ = torch.count_nonzero(out != reference).item()
        med = statistics.median(times)
        print(f"{name:<16} {med * 1e3:10.2f} {min(times) * 1e3:6.2f}-{max(times) * 1e3:<7.2f} {nbytes / med / 1e9:7.2f}"
              f"   ({differ} of {out.numel()} values differ from {next(iter(variants))})")


if __name__ == "__main__":
    main()
