"""CPU attention: fastattn cpu kernel vs naive (reference.attention) vs torch SDPA, fp32, B=1, H=8, D=64."""

import argparse

import torch
import torch.nn.functional as F
from torch.utils import benchmark

import fastattn
from fastattn import reference


def timed(fn, min_run_time):
    return benchmark.Timer("fn()", globals={"fn": fn}).blocked_autorange(min_run_time=min_run_time).median


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=2048)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--causal", action="store_true")
    ap.add_argument("--min-run-time", type=float, default=1.0)
    args = ap.parse_args()
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 8, args.n, 64, requires_grad=True) for _ in range(3))
    dout = torch.randn(1, 8, args.n, 64)
    c = args.causal

    def fa():
        with fastattn.use_backend("cpu"):
            return fastattn.scaled_dot_product_attention(q, k, v, is_causal=c)

    impls = {
        "fastattn_cpu": fa,
        "naive": lambda: reference.attention(q, k, v, is_causal=c),
        "torch_sdpa": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=c),
    }
    res = {name: {"fwd": [], "fwd_bwd": []} for name in impls}
    for _ in range(args.rounds):  # interleaved: the machine is shared, so every round sees similar load
        for name, fn in impls.items():
            with torch.no_grad():
                res[name]["fwd"].append(timed(fn, args.min_run_time))
            res[name]["fwd_bwd"].append(timed(lambda fn=fn: torch.autograd.grad(fn(), (q, k, v), dout), args.min_run_time))
    out = {name: {key: min(vals) * 1e3 for key, vals in r.items()} for name, r in res.items()}
    for name, r in out.items():
        print(f"N={args.n} causal={c} {name:13s} fwd {r['fwd']:8.1f} ms   fwd+bwd {r['fwd_bwd']:8.1f} ms")
    f, nv, sd = out["fastattn_cpu"], out["naive"], out["torch_sdpa"]
    print(
        f"speedup vs naive: fwd {nv['fwd'] / f['fwd']:.2f}x  fwd+bwd {nv['fwd_bwd'] / f['fwd_bwd']:.2f}x;  "
        f"vs torch SDPA: fwd {sd['fwd'] / f['fwd']:.2f}x  fwd+bwd {sd['fwd_bwd'] / f['fwd_bwd']:.2f}x"
    )


if __name__ == "__main__":
    main()
