"""Fused expert layers vs the loop-of-experts pattern and a batched-einsum version, forward and forward+backward.

Grid (MBREC_FAST_BENCH_FULL=1): B in {512, 4096, 32768}, D = 256, H in {64, 128}, E in {4, 8, 16}, T in {1, 2, 6}.
Default: B = 512 small cases plus the goal case B = 4096, D = 256, H = 128, E = 8, T = 2.
extra_info: gflops (expert GEMM FLOPs / time), frac_sgemm_bound (time / time of the same FLOPs at the sgemm rate
measured in the same run on X[B, D] @ W[D, E*H], routed: X[B*k, D] @ W[D, H]; 1.0 = at the bound),
frac_sgemm2048_bound (the same against a bare 2048^3 sgemm measured in the same run), and the CUDA
kernel count on a GPU.
"""
import os
import time

import pytest
import torch

import mbrec_fast as mf
from mbrec_fast.nn import from_loop
from mbrec_fast.reference.experts import LoopGatedExperts, routed_experts_ref

FULL = os.environ.get("MBREC_FAST_BENCH_FULL", "0") == "1"
DEV = "cuda" if torch.cuda.is_available() else "cpu"
D = 256

if FULL:
    GRID = [(B, H, E, T) for B in (512, 4096, 32768) for H in (64, 128) for E in (4, 8, 16) for T in (1, 2, 6)]
else:
    GRID = [(512, 64, 4, 2), (4096, 128, 8, 2)]

_SGEMM_CACHE = {}


def _sync():
    if DEV == "cuda":
        torch.cuda.synchronize()


def sgemm_seconds(B: int, N: int) -> float:
    """Best-of time of X[B, D] @ W[D, N] in fp32 on this device, measured now (the bound's rate)."""
    key = (B, N)
    if key not in _SGEMM_CACHE:
        a, w = torch.randn(B, D, device=DEV), torch.randn(D, N, device=DEV)
        a @ w
        best = float("inf")
        for _ in range(5 if B * N < 2 ** 24 else 3):
            _sync()
            t = time.perf_counter()
            a @ w
            _sync()
            best = min(best, time.perf_counter() - t)
        _SGEMM_CACHE[key] = best
    return _SGEMM_CACHE[key]


def sgemm2048_rate() -> float:
    """FLOP/s of a bare 2048^3 fp32 GEMM on this device, best of 3, measured once per run (the issue's yardstick)."""
    if "2048" not in _SGEMM_CACHE:
        a, b = torch.randn(2048, 2048, device=DEV), torch.randn(2048, 2048, device=DEV)
        a @ b
        best = float("inf")
        for _ in range(3):
            _sync()
            t = time.perf_counter()
            a @ b
            _sync()
            best = min(best, time.perf_counter() - t)
        _SGEMM_CACHE["2048"] = 2 * 2048 ** 3 / best
    return _SGEMM_CACHE["2048"]


class EinsumGatedExperts(torch.nn.Module):
    """Batched-einsum baseline: all experts in one einsum, softmax gates, one einsum for the mixtures."""

    def __init__(self, fused):
        super().__init__()
        ex = fused.experts
        self.w, self.b = ex.weight[0], ex.bias[0]
        self.gw, self.gb = fused.gate_weight, fused.gate_bias

    def forward(self, x):
        h = torch.relu(torch.einsum("bd,edh->ebh", x, self.w) + self.b.unsqueeze(1))
        g = torch.softmax(torch.einsum("bd,tde->tbe", x, self.gw) + self.gb.unsqueeze(1), -1)
        return torch.einsum("tbe,ebh->tbh", g, h)


def _modules(H, E, T):
    torch.manual_seed(0)
    loop = LoopGatedExperts(D, [H], E, T).to(DEV)
    fused = from_loop(loop.experts, loop.gates)
    return {"mbrec_fast": fused, "loop": loop, "einsum": EinsumGatedExperts(fused)}


def _kernel_count(fn) -> int:
    if DEV != "cuda":
        return -1
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        _sync()
    return sum(1 for e in prof.events() if e.device_type.name == "CUDA")


@pytest.mark.parametrize("mode", ["fwd", "fwd_bwd"])
@pytest.mark.parametrize("impl", ["mbrec_fast", "loop", "einsum"])
@pytest.mark.parametrize("B,H,E,T", GRID)
def test_bench_gated_experts(benchmark, record, B, H, E, T, impl, mode):
    mod = _modules(H, E, T)[impl]
    x = torch.randn(B, D, device=DEV, requires_grad=mode == "fwd_bwd")

    if mode == "fwd":
        def run():
            with torch.no_grad():
                out = mod(x)
            _sync()
            return out
    else:
        def run():
            out = mod(x)
            out.sum().backward()
            _sync()
            return out

    rounds = 3 if B >= 32768 else 5
    benchmark.pedantic(run, rounds=rounds, iterations=1, warmup_rounds=1)
    gemm_flops = 2 * B * D * E * H * (1 if mode == "fwd" else 3)
    bound = sgemm_seconds(B, E * H) * (1 if mode == "fwd" else 3)
    stats = getattr(benchmark, "stats", None)
    t = stats.stats.min if stats is not None else None
    extra = {}
    if t:
        extra = dict(gflops=gemm_flops / t / 1e9, frac_sgemm_bound=t / bound,
                     frac_sgemm2048_bound=t * sgemm2048_rate() / gemm_flops)
    benchmark.group = f"gated_experts {mode}: B={B} H={H} E={E} T={T}"
    record(op=f"gated_experts_{mode}", case=f"B={B} D={D} H={H} E={E} T={T}", impl=impl, B=B, D=D, H=H, E=E, T=T,
           sgemm_gflops=2 * B * D * E * H / sgemm_seconds(B, E * H) / 1e9, kernels=_kernel_count(run), **extra)


ROUTED_GRID = [(4096, 128, 8, 1), (4096, 128, 8, 2)] if not FULL else \
    [(B, H, E, k) for B in (512, 4096, 32768) for H in (64, 128) for E in (4, 8, 16) for k in (1, 2)]
if not FULL:
    ROUTED_GRID = [(512, 64, 4, 1), (4096, 128, 8, 2)]


@pytest.mark.parametrize("mode", ["fwd", "fwd_bwd"])
@pytest.mark.parametrize("impl", ["mbrec_fast", "loop"])
@pytest.mark.parametrize("B,H,E,k", ROUTED_GRID)
def test_bench_routed_experts(benchmark, record, B, H, E, k, impl, mode):
    torch.manual_seed(0)
    w = (torch.randn(E, D, H, device=DEV) * D ** -0.5).requires_grad_()
    b = torch.zeros(E, H, device=DEV, requires_grad=True)
    x = torch.randn(B, D, device=DEV, requires_grad=mode == "fwd_bwd")
    route = torch.stack([torch.randperm(E, device=DEV)[:k] for _ in range(B)]) if k > 1 else \
        torch.randint(0, E, (B, 1), device=DEV)
    rw = torch.rand(B, k, device=DEV)
    fn = mf.routed_experts if impl == "mbrec_fast" else routed_experts_ref

    def run():
        if mode == "fwd":
            with torch.no_grad():
                out = fn(x, w, b, route, rw)
        else:
            out = fn(x, w, b, route, rw)
            out.sum().backward()
        _sync()
        return out

    benchmark.pedantic(run, rounds=5, iterations=1, warmup_rounds=1)
    gemm_flops = 2 * B * k * D * H * (1 if mode == "fwd" else 3)
    bound = sgemm_seconds(B * k, H) * (1 if mode == "fwd" else 3)  # the same FLOPs as one [B*k, D] x [D, H] GEMM
    stats = getattr(benchmark, "stats", None)
    t = stats.stats.min if stats is not None else None
    extra = dict(gflops=gemm_flops / t / 1e9, frac_sgemm_bound=t / bound,
                 frac_sgemm2048_bound=t * sgemm2048_rate() / gemm_flops) if t else {}
    benchmark.group = f"routed_experts {mode}: B={B} H={H} E={E} k={k}"
    record(op=f"routed_experts_{mode}", case=f"B={B} D={D} H={H} E={E} k={k}", impl=impl, B=B, D=D, H=H, E=E, k=k,
           kernels=_kernel_count(run), **extra)
