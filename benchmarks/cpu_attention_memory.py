"""Peak resident memory of one attention call (B=1, H=8, D=64, fp32) at length N, in a fresh process."""

import subprocess
import sys

CODE = r"""
import resource, sys, torch
import fastattn
from fastattn import reference
n, which = int(sys.argv[1]), sys.argv[2]
torch.manual_seed(0)
q, k, v = (torch.randn(1, 8, n, 64, requires_grad=which.endswith("bwd")) for _ in range(3))
fn = {"fastattn_cpu": lambda: fastattn.scaled_dot_product_attention(q, k, v),
      "naive": lambda: reference.attention(q, k, v)}[which.split(":")[0]]
with fastattn.use_backend("cpu"):
    fastattn.scaled_dot_product_attention(q[:, :, :64], k[:, :, :64], v[:, :, :64])  # load the extension
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
if which.endswith("bwd"):
    with fastattn.use_backend("cpu"):
        out = fn()
    torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
else:
    with torch.no_grad(), fastattn.use_backend("cpu"):
        fn()
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print((peak - base) / 1024)
"""

n = int(sys.argv[1]) if len(sys.argv) > 1 else 8192
for which in sys.argv[2:] or ["fastattn_cpu:fwd", "fastattn_cpu:fwd_bwd", "naive:fwd"]:
    mib = float(
        subprocess.run([sys.executable, "-c", CODE, str(n), which], capture_output=True, text=True, check=True).stdout
    )
    print(f"N={n} {which:22s} peak RSS above inputs: {mib:9.1f} MiB")
print(
    f"(one fp32 (1, 8, N, N) score tensor is {8 * n * n * 4 / 2**20:.0f} MiB; q/k/v/out each {8 * n * 64 * 4 / 2**20:.0f} MiB)"
)
