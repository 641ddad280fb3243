"""The graph op row_l2_normalize (csrc/graph/row_norm_core.h): values and gradients against F.normalize (the
reference) over widths that hit every lane of the eight-lane sums, with zero, tiny, huge and NaN rows; the same bits
on every thread count; gradcheck; opcheck and torch.compile; a hypothesis property; bad input naming the argument;
the CUDA kernel bit for bit against the CPU."""
import pytest
import torch
from hypothesis import given, settings, strategies as st

from mbrec_fast.graph import row_l2_normalize
from mbrec_fast.reference.graph import row_l2_normalize_ref

ops = torch.ops.mbrec_fast
WIDTHS = [0, 1, 5, 7, 8, 9, 16, 32, 33, 64, 100]


def _rows(n, d, dtype, seed):
    """Random rows with the awkward ones: all zero, below eps, huge, and one of single nonzero."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=dtype)
    if n >= 4 and d:
        x[0] = 0.0
        x[1] = 1e-14
        x[2] *= 1e18
        x[3] = 0.0
        x[3, d // 2] = -3.0
    return x


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("d", WIDTHS)
def test_matches_reference(dtype, d):
    x = _rows(50, d, dtype, seed=d)
    grad = torch.randn(50, d, dtype=dtype, generator=torch.Generator().manual_seed(100 + d))
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = row_l2_normalize(xa), row_l2_normalize_ref(xb)
    tol = dict(rtol=2e-6, atol=1e-7) if dtype == torch.float32 else dict(rtol=1e-14, atol=1e-15)
    torch.testing.assert_close(ya, yb, **tol)
    ya.backward(grad)
    yb.backward(grad)
    torch.testing.assert_close(xa.grad, xb.grad, rtol=tol["rtol"] * 10, atol=tol["atol"] * 1e12 if d else 0)


def test_norms_and_nan_rows_propagate():
    x = torch.tensor([[3.0, 4.0], [0.0, 0.0], [float("nan"), 1.0]])
    y, norm = ops.row_l2_normalize(x, 1e-12)
    assert norm[:2].tolist() == [5.0, 0.0] and torch.isnan(norm[2])
    assert y[0].tolist() == pytest.approx([0.6, 0.8]) and y[1].tolist() == [0.0, 0.0]
    assert torch.isnan(y[2]).all() and torch.isnan(row_l2_normalize_ref(x)[2]).all()   # as F.normalize


def test_same_bits_on_every_thread_count():
    x = torch.randn(5000, 37, generator=torch.Generator().manual_seed(1))
    g = torch.randn(5000, 37, generator=torch.Generator().manual_seed(2))
    before = torch.get_num_threads()
    outs = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            y, norm = ops.row_l2_normalize(x, 1e-12)
            outs.append((y, norm, ops.row_l2_normalize_backward(g, y, norm, 1e-12)))
    finally:
        torch.set_num_threads(before)
    for out in outs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(out, outs[0]))


@settings(max_examples=60, deadline=None)
@given(n=st.integers(0, 30), d=st.integers(0, 40), scale=st.floats(1e-6, 1e6), seed=st.integers(0, 2 ** 16))
def test_property_unit_norm_and_scale_invariance(n, d, scale, seed):
    x = torch.randn(n, d, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    y = row_l2_normalize(x)
    norms = y.norm(dim=-1)
    nonzero = x.norm(dim=-1) > 1e-12
    torch.testing.assert_close(norms[nonzero], torch.ones_like(norms[nonzero]), rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(row_l2_normalize(x * scale), y, rtol=1e-13, atol=1e-13)


def test_gradcheck():
    x = torch.randn(6, 9, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(row_l2_normalize, (x,))
    x0 = torch.zeros(2, 3, dtype=torch.float64, requires_grad=True)            # clamped rows: linear, x / eps
    assert torch.autograd.gradcheck(lambda t: row_l2_normalize(t, eps=1.0), (x0,))


def test_opcheck_and_compile():
    x = torch.randn(12, 10)
    torch.library.opcheck(ops.row_l2_normalize, (x, 1e-12))
    torch.library.opcheck(ops.row_l2_normalize, (x.clone().requires_grad_(), 1e-12))
    y, norm = ops.row_l2_normalize(x, 1e-12)
    torch.library.opcheck(ops.row_l2_normalize_backward, (torch.randn(12, 10), y, norm, 1e-12))

    def f(t):
        return (row_l2_normalize(t) * 2.0).sum()
    xc = x.clone().requires_grad_()
    out = torch.compile(f, fullgraph=True, backend="aot_eager")(xc)
    out.backward()
    xr = x.clone().requires_grad_()
    f(xr).backward()
    assert torch.equal(out.detach(), f(x)) and torch.equal(xc.grad, xr.grad)


@pytest.mark.parametrize("call,message", [
    (lambda: row_l2_normalize(torch.randn(5)), "x must be a 2-D tensor"),
    (lambda: ops.row_l2_normalize(torch.randn(3, 2).int(), 1e-12), "x must be float32 or float64"),
    (lambda: ops.row_l2_normalize(torch.randn(3, 4).t(), 1e-12), "x must be contiguous"),
    (lambda: ops.row_l2_normalize(torch.randn(3, 2), 0.0), "eps must be positive and finite"),
    (lambda: ops.row_l2_normalize(torch.randn(3, 2), float("inf")), "eps must be positive and finite"),
    (lambda: ops.row_l2_normalize_backward(torch.randn(3, 2), torch.randn(3, 3), torch.ones(3), 1e-12),
     "y must have grad's shape"),
    (lambda: ops.row_l2_normalize_backward(torch.randn(3, 2), torch.randn(3, 2), torch.ones(2), 1e-12),
     "norm must have one entry per row of grad"),
    (lambda: ops.row_l2_normalize_backward(torch.randn(3, 2), torch.randn(3, 2).double(), torch.ones(3), 1e-12),
     "y must have dtype"),
])
def test_bad_input_is_a_clear_error(call, message):
    with pytest.raises((RuntimeError, ValueError), match=message):
        call()


def test_non_contiguous_input_through_the_wrapper():
    x = torch.randn(8, 6)
    assert torch.equal(row_l2_normalize(x.t()), row_l2_normalize(x.t().contiguous()))


@pytest.mark.gpu
def test_cuda_kernel_matches_cpu_bit_for_bit():
    """The CUDA kernel runs the CPU's per-row core (row_norm_core.h): the same bits, forward and backward."""
    for dtype in (torch.float32, torch.float64):
        x = _rows(3000, 70, dtype, seed=5)
        g = torch.randn(3000, 70, dtype=dtype)
        xc = x.cuda().requires_grad_()
        y = row_l2_normalize(xc)
        y.backward(g.cuda())
        xr = x.clone().requires_grad_()
        y_cpu = row_l2_normalize(xr)
        y_cpu.backward(g)
        assert torch.equal(y.detach().cpu(), y_cpu.detach()) and torch.equal(xc.grad.cpu(), xr.grad)
    with pytest.raises(RuntimeError, match="eps must be positive"):
        ops.row_l2_normalize(torch.randn(3, 2).cuda(), -1.0)
