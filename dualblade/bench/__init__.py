"""`dualblade bench`: the paper's comparison on the user's own machine.

A matrix of policies x budgets, each cell a fresh process (cell.py) in a cgroup (cgroup.py) limited to weights +
budget + a fixed overhead, so that the page cache counts as the kernel counts it. Stock llama_cpp.Llama runs at
the same limits ("OOM" is a valid result). A device probe (probes.py) measures the KV location's O_DIRECT read
bandwidth in the same run, so every decode figure can be set against the I/O bound. Cells are interleaved (each
repetition walks the whole matrix) because the disks of shared machines drift: compare within a run, quote ratios
and medians. host.py runs the host matrix, gpu.py the `--gpu` one (the VRAM tier); matrix.py holds what they
share.
"""
from __future__ import annotations

from typing import Callable, Optional

from .gpu import run_bench_gpu
from .host import run_bench_host
from .matrix import GPU_POLICIES, POLICIES, BenchOptions, check_options, parse_budgets


def run_bench(opts: BenchOptions, on_progress: Optional[Callable[[str, int, int], None]] = None,
              log: Callable[[str], None] = lambda s: None) -> dict:
    """The whole run, host or GPU matrix (opts.gpu): every raw figure, the summary and the ratios."""
    return (run_bench_gpu if opts.gpu else run_bench_host)(opts, on_progress, log)


__all__ = ["BenchOptions", "GPU_POLICIES", "POLICIES", "check_options", "parse_budgets", "run_bench"]
