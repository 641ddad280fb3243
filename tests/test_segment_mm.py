"""The segment GEMMs behind the expert layers' CPU path (csrc/experts/segment_mm_cpu.cpp, the
GEMM tile in csrc/cpu_kernels_<isa>.cpp):
every variant this CPU can run (forced through MBREC_FAST_CPU_ISA) against an fp64 reference, on shapes that hit
partial tiles and panels, empty segments, k = 0 and more than one block of k; bit-identity across thread counts and
between the AVX2 and AVX-512 micro-kernels (each output one FMA chain in k order); opcheck; bad input."""
import pytest
import torch

from test_cpu_kernels import supported, variant  # noqa: F401 (the fixture)

ops = torch.ops.mbrec_fast


def _offsets(sizes):
    off = torch.zeros(len(sizes) + 1, dtype=torch.int64)
    off[1:] = torch.tensor(sizes, dtype=torch.int64).cumsum(0)
    return off


def ref_segment_mm(a, b, off, bias, transpose_b):
    out = torch.empty(a.shape[0], b.shape[1] if transpose_b else b.shape[2], dtype=torch.float64)
    for e in range(b.shape[0]):
        s, t = int(off[e]), int(off[e + 1])
        be = b[e].double().t() if transpose_b else b[e].double()
        out[s:t] = a[s:t].double() @ be + (0 if bias is None else bias[e].double())
    return out


def ref_segment_mm_tn(a, c, off):
    E = off.shape[0] - 1
    out = torch.zeros(E, a.shape[1], c.shape[1], dtype=torch.float64)
    for e in range(E):
        s, t = int(off[e]), int(off[e + 1])
        out[e] = a[s:t].double().t() @ c[s:t].double()
    return out


# rows per segment (empty ones, partial 12- / 6-row tiles), K (0, 1, partial, > one 256-block), M (partial panels)
CASES = [([5, 0, 13], 7, 16), ([1], 1, 1), ([37, 12, 0, 25], 300, 70), ([0, 0], 9, 33), ([200], 64, 128),
         ([3, 4], 0, 40), ([100, 77], 513, 32)]


@pytest.mark.parametrize("sizes,K,M", CASES)
@pytest.mark.parametrize("transpose_b", [False, True])
@pytest.mark.parametrize("with_bias", [False, True])
def test_segment_mm_matches_reference(variant, sizes, K, M, transpose_b, with_bias):
    gen = torch.Generator().manual_seed(len(sizes) * 1000 + K * 10 + M)
    E, N = len(sizes), sum(sizes)
    a = torch.randn(N, K, generator=gen)
    b = torch.randn((E, M, K) if transpose_b else (E, K, M), generator=gen)
    bias = torch.randn(E, M, generator=gen) if with_bias else None
    off = _offsets(sizes)
    out = ops.segment_mm(a, b, off, bias, transpose_b)
    ref = ref_segment_mm(a, b, off, bias, transpose_b)
    assert out.shape == (N, M) and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5 * max(K, 1) ** 0.5)


@pytest.mark.parametrize("sizes,P,M", [([5, 0, 13], 7, 16), ([300, 1], 37, 70), ([0], 12, 32), ([600], 256, 128),
                                       ([2, 3], 1, 1)])
def test_segment_mm_tn_matches_reference(variant, sizes, P, M):
    gen = torch.Generator().manual_seed(sum(sizes) + P * 7 + M)
    N = sum(sizes)
    a, c = torch.randn(N, P, generator=gen), torch.randn(N, M, generator=gen)
    off = _offsets(sizes)
    out = ops.segment_mm_tn(a, c, off)
    assert out.shape == (len(sizes), P, M)
    torch.testing.assert_close(out.double(), ref_segment_mm_tn(a, c, off), rtol=1e-5,
                               atol=1e-5 * max(max(sizes), 1) ** 0.5)
    for e, n in enumerate(sizes):
        if n == 0:
            assert torch.equal(out[e], torch.zeros(P, M))  # an empty segment's product is exactly zero


def test_integer_inputs_are_exact(variant):
    # small integers: every partial sum is exact in fp32, so any summation order gives torch's result exactly
    gen = torch.Generator().manual_seed(3)
    a, b = torch.randint(-3, 4, (301, 270), generator=gen).float(), torch.randint(-3, 4, (3, 270, 45), generator=gen).float()
    off = _offsets([100, 0, 201])
    assert torch.equal(ops.segment_mm(a, b, off, None, False), ref_segment_mm(a, b, off, None, False).float())
    c = torch.randint(-3, 4, (301, 45), generator=gen).float()
    assert torch.equal(ops.segment_mm_tn(a, c, off), ref_segment_mm_tn(a, c, off).float())


def test_fp64_runs_at_mm():
    gen = torch.Generator().manual_seed(5)
    a, b, bias = (torch.randn(20, 9, dtype=torch.float64, generator=gen),
                  torch.randn(2, 9, 5, dtype=torch.float64, generator=gen),
                  torch.randn(2, 5, dtype=torch.float64, generator=gen))
    off = _offsets([8, 12])
    out = ops.segment_mm(a, b, off, bias, False)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, ref_segment_mm(a, b, off, bias, False))
    torch.testing.assert_close(ops.segment_mm_tn(a, a, off), ref_segment_mm_tn(a, a, off))


def _both(a, b, c, off):
    return ops.segment_mm(a, b, off, None, False), ops.segment_mm(c, b, off, None, True), ops.segment_mm_tn(a, c, off)


def test_same_bits_on_any_thread_count_and_simd_width(monkeypatch):
    gen = torch.Generator().manual_seed(11)
    a, b = torch.randn(1500, 300, generator=gen), torch.randn(4, 300, 300, generator=gen)
    c = torch.randn(1500, 300, generator=gen)
    off = _offsets([700, 0, 555, 245])
    simd = [v for v in supported() if v != "portable"]
    if not simd:
        pytest.skip("no SIMD variant on this CPU")
    before = torch.get_num_threads()
    outs = []
    try:
        for v in simd:
            monkeypatch.setenv("MBREC_FAST_CPU_ISA", v)
            for n in (1, 2, 3):
                torch.set_num_threads(n)
                outs.append(_both(a, b, c, off))
    finally:
        torch.set_num_threads(before)
    for out in outs[1:]:
        for x, y in zip(out, outs[0]):
            assert torch.equal(x, y)


def test_opcheck():
    gen = torch.Generator().manual_seed(2)
    a, b, bias = torch.randn(30, 8, generator=gen), torch.randn(3, 8, 20, generator=gen), torch.randn(3, 20, generator=gen)
    off = _offsets([10, 0, 20])
    torch.library.opcheck(ops.segment_mm, (a, b, off, bias, False))
    torch.library.opcheck(ops.segment_mm, (a, b.transpose(1, 2).contiguous(), off, None, True))
    torch.library.opcheck(ops.segment_mm_tn, (a, torch.randn(30, 20, generator=gen), off))


@pytest.mark.parametrize("call, message", [
    (lambda a, b, off: ops.segment_mm(a.half(), b, off, None, False), "a must be float32 or float64"),
    (lambda a, b, off: ops.segment_mm(a, b.double(), off, None, False), "b must have dtype"),
    (lambda a, b, off: ops.segment_mm(a, b[:2], off, None, False), "b must have one matrix per segment"),
    (lambda a, b, off: ops.segment_mm(a, b[:, :3].contiguous(), off, None, False), r"b must be \[E, K, M\]"),
    (lambda a, b, off: ops.segment_mm(a, b, off, None, True), r"b must be \[E, M, K\]"),
    (lambda a, b, off: ops.segment_mm(a, b, off, torch.zeros(3, 4), False), r"bias must be \[E, M\]"),
    (lambda a, b, off: ops.segment_mm(a, b, torch.tensor([0, 5, 9, 30]), None, False), "offsets must run from 0"),
    (lambda a, b, off: ops.segment_mm(a, b, torch.tensor([0, 9, 5, 10]), None, False), "non-decreasing"),
    (lambda a, b, off: ops.segment_mm(a, b, off.int(), None, False), "offsets must have dtype"),
    (lambda a, b, off: ops.segment_mm_tn(a, torch.zeros(9, 2), off), "c must have the rows of a"),
    (lambda a, b, off: ops.segment_mm_tn(a, torch.zeros(10, 2).t(), off), "c must be contiguous"),
])
def test_bad_input_is_a_clear_error(call, message):
    a, b, off = torch.zeros(10, 6), torch.zeros(3, 6, 5), _offsets([4, 0, 6])
    with pytest.raises(RuntimeError, match=message):
        call(a, b, off)
