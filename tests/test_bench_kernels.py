"""Smoke test of benchmarks/bench_kernels.py, so the script behind the kernel figures in the docs
cannot rot: one repeat of its depthwise and convolution parts. The depthwise part itself checks
every kernel's output against the per-pixel one before timing it (an AssertionError here)."""

from __future__ import annotations

from benchmarks import bench_kernels


def test_bench_kernels_depthwise_and_conv_parts_run(capsys):
    assert bench_kernels.main(["--threads", "1", "--repeats", "1", "--parts", "depthwise", "conv"]) == 0
    out = capsys.readouterr().out
    assert out.count("stride") == len(bench_kernels.DEPTHWISE) + len(bench_kernels.CONVS)
    assert "GMAC/s" in out
