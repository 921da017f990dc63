"""Peak RSS of GPTQ's inverse-Hessian factorisation beyond the Hessian itself, in Hessian sizes.

Usage: MALLOC_MMAP_THRESHOLD_=65536 python benchmarks/factorisation_rss.py [--n 4000]
One process per measurement (the high-water mark is the process's); the lowbit imported is the
one on ``sys.path`` (``PYTHONPATH=<a checkout>`` measures that checkout's version). A 70B
down_proj's H is 28672 x 28672 fp32 (3.06 GiB): multiply the printed ratio by that.
"""

from __future__ import annotations

import argparse

import torch

from lowbit.algorithms.gptq import inverse_hessian_cholesky
from lowbit.memory import peak_rss_mb, reset_peak_rss, rss_bytes


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=4000, help="Hessian size n x n (fp32)")
    args = p.parse_args()
    torch.manual_seed(0)
    x = torch.randn(args.n, args.n // 2)
    h = x @ x.T  # rank-deficient: the damping is what makes it factorise
    del x
    size_mib = args.n**2 * 4 / 2**20
    base = rss_bytes() / 2**20
    reset_peak_rss()
    inverse_hessian_cholesky(h, 0.01)
    extra = (peak_rss_mb() - base) / size_mib
    print(f"n {args.n}: peak beyond H {extra:.2f} H-sizes (result included), H {size_mib:.0f} MiB")


if __name__ == "__main__":
    main()
