"""vLLM's CPU INT8 kernels against plain torch, outside any model (run with the vLLM venv's
python: /work/venvs/vllm/bin/python benchmarks/vllm/int8_kernel_check.py).

Checks the two ops `CPUInt8ScaledMMLinearKernel` runs on this CPU (oneDNN path): the activation
quantizer `onednn_scaled_int8_quant` (static per-tensor scale that clips, and dynamic per token)
against ``clamp(round(x / s), -128, 127)`` with ``s = amax / 127``, and `onednn_scaled_mm` against
the fp32 product of the dequantized operands, on random activations with one outlier channel.
Prints the differences; used to narrow down why vLLM's W8A8-INT8 log-probabilities differ from
lowbit's (docs/EXPORT.md, "Checked in vLLM").
"""

from __future__ import annotations

import torch
import vllm._custom_ops as ops


def main() -> None:
    torch.manual_seed(0)
    k, n, m = 576, 192, 64
    x = torch.randn(m, k) * 3
    x[:, 5] *= 100  # an outlier channel, as SmolLM2's
    wq = torch.randint(-127, 128, (n, k), dtype=torch.int8)
    ws = torch.rand(n, 1) * 1e-3 + 1e-4
    for static in (True, False):
        if static:
            s = torch.tensor([x.abs().max().item() / 127 * 0.3])  # clips the outliers
            xq, xs, xzp = ops.onednn_scaled_int8_quant(x, s, None, True)
            ref_q = torch.clamp(torch.round(x / s), -128, 127).to(torch.int8)
            azp_adj = None
        else:
            xq, xs, xzp = ops.onednn_scaled_int8_quant(x, None, None, True)
            s = x.abs().amax(-1, keepdim=True) / 127
            ref_q = torch.clamp(torch.round(x / s), -128, 127).to(torch.int8)
            azp_adj = wq.t().sum(0, keepdim=True, dtype=torch.float32) * ws.view(-1)
        handler = ops.create_onednn_scaled_mm(wq.t(), ws.view(-1), torch.float32, not static,
                                              False, 32)
        out = torch.empty(m, n)
        ops.onednn_scaled_mm(handler, xq, out, xs, xzp, azp_adj, None)
        ref = (xq.float() * xs.view(-1, 1)) @ (wq.float() * ws).t()
        label = "static per-tensor" if static else "dynamic per-token"
        print(f"{label}: codes differing {(xq != ref_q).sum().item()} of {xq.numel()}, "
              f"scale max rel diff {((xs.view(-1) - s.view(-1)).abs() / s.view(-1)).max():.1e}, "
              f"GEMM max rel err {((out - ref).abs().max() / ref.abs().max()):.1e}")


if __name__ == "__main__":
    main()
