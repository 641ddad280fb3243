"""The graph op csr_spmm (csrc/graph/, row kernel in csrc/cpu_kernels_<isa>.cpp): every variant this CPU can run
(forced through MBREC_FAST_CPU_ISA) against the fp64 reference on graphs with empty rows, duplicate entries and
widths that hit every chunk of the row kernel; bit-identity across variants and thread counts (one FMA chain per
element in storage order); gradients through the transpose (gradcheck, gradgradcheck); opcheck and torch.compile;
the transpose helper; bad input naming the argument."""
import pytest
import torch
from hypothesis import given, settings, strategies as st

from mbrec_fast.graph import csr_spmm, csr_transpose
from mbrec_fast.reference.graph import csr_spmm_ref
from test_cpu_kernels import supported, variant  # noqa: F401 (the fixture)

ops = torch.ops.mbrec_fast


def random_csr(rows, cols, density, seed, dtype=torch.float32, duplicates=False):
    """A random CSR matrix (crow, col, val); `duplicates` repeats some entries within their row."""
    gen = torch.Generator().manual_seed(seed)
    mask = torch.rand(rows, cols, generator=gen) < density
    r, c = mask.nonzero(as_tuple=True)
    if duplicates and r.numel():
        pick = torch.randint(0, r.numel(), (max(1, r.numel() // 4),), generator=gen)
        r, c = torch.cat([r, r[pick]]), torch.cat([c, c[pick]])
        order = torch.argsort(r, stable=True)
        r, c = r[order], c[order]
    crow = torch.zeros(rows + 1, dtype=torch.long)
    crow[1:] = torch.cumsum(torch.bincount(r, minlength=rows), 0)
    return crow, c.contiguous(), torch.randn(c.numel(), generator=gen, dtype=dtype)


# (rows, cols, density): empty rows, a row-less / column-less matrix, long rows
GRAPHS = [(1, 1, 1.0), (30, 17, 0.2), (0, 5, 0.5), (7, 0, 0.5), (200, 150, 0.05), (64, 900, 0.4)]
# widths: below one AVX2 vector, exact vectors, 4-vector chunks, chunks plus vectors plus a scalar tail
WIDTHS = [0, 1, 5, 8, 16, 32, 48, 64, 65, 100, 200]


@pytest.mark.parametrize("rows,cols,density", GRAPHS)
@pytest.mark.parametrize("d", WIDTHS)
def test_matches_reference(variant, rows, cols, density, d):
    a = random_csr(rows, cols, density, seed=rows * 7 + d, duplicates=True)
    x = torch.randn(cols, d, generator=torch.Generator().manual_seed(d))
    y = ops.csr_spmm(*a, x)
    assert y.shape == (rows, d) and y.dtype == torch.float32
    longest = int(a[0].diff().max()) if rows else 0
    torch.testing.assert_close(y.double(), csr_spmm_ref(*a, x), rtol=1e-5, atol=1e-6 * max(longest, 1) ** 0.5)


def test_integer_inputs_are_exact(variant):
    crow, col, _ = random_csr(90, 60, 0.3, seed=3, duplicates=True)
    gen = torch.Generator().manual_seed(4)
    val = torch.randint(-3, 4, col.shape, generator=gen).float()
    x = torch.randint(-5, 6, (60, 77), generator=gen).float()
    assert torch.equal(ops.csr_spmm(crow, col, val, x).double(), csr_spmm_ref(crow, col, val, x))


def test_fp64_matches_reference():
    a = random_csr(40, 30, 0.3, seed=5, dtype=torch.float64, duplicates=True)
    x = torch.randn(30, 19, dtype=torch.float64)
    torch.testing.assert_close(ops.csr_spmm(*a, x), csr_spmm_ref(*a, x), rtol=1e-12, atol=1e-12)


def test_same_bits_on_every_variant_and_thread_count(monkeypatch):
    a = random_csr(700, 500, 0.05, seed=6, duplicates=True)
    xs = [torch.randn(500, d, generator=torch.Generator().manual_seed(d)) for d in (32, 64, 71)]
    before = torch.get_num_threads()
    outs = []
    try:
        for v in supported():
            monkeypatch.setenv("MBREC_FAST_CPU_ISA", v)
            for n in (1, 2, 3):
                torch.set_num_threads(n)
                outs.append([ops.csr_spmm(*a, x) for x in xs])
    finally:
        torch.set_num_threads(before)
    for out in outs[1:]:
        for y, y0 in zip(out, outs[0]):
            assert torch.equal(y, y0)


@settings(max_examples=25, deadline=None)
@given(rows=st.integers(0, 40), cols=st.integers(1, 40), d=st.integers(0, 70), density=st.floats(0.0, 1.0),
       seed=st.integers(0, 10_000))
def test_property_matches_reference(rows, cols, d, density, seed):
    a = random_csr(rows, cols, density, seed, duplicates=seed % 2 == 0)
    x = torch.randn(cols, d, generator=torch.Generator().manual_seed(seed))
    torch.testing.assert_close(csr_spmm(a, x).double(), csr_spmm_ref(*a, x), rtol=1e-5, atol=1e-5)


def test_transpose_matches_dense():
    crow, col, val = random_csr(23, 31, 0.3, seed=8, duplicates=True)
    t_crow, t_col, t_val = csr_transpose((crow, col, val), 31)
    dense = torch.zeros(23, 31).index_put_((torch.repeat_interleave(torch.arange(23), crow.diff()), col), val,
                                           accumulate=True)
    x = torch.randn(23, 4)
    torch.testing.assert_close(ops.csr_spmm(t_crow, t_col, t_val, x), dense.T @ x, rtol=1e-5, atol=1e-5)
    assert bool((t_crow.diff() >= 0).all()) and int(t_crow[-1]) == col.numel()


def test_gradients():
    a = random_csr(25, 18, 0.3, seed=9, dtype=torch.float64, duplicates=True)
    t = csr_transpose(a, 18)
    x = torch.randn(18, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: csr_spmm(a, x, t), (x,))
    assert torch.autograd.gradgradcheck(lambda x: csr_spmm(a, x, t), (x,))
    # fp32 against autograd through the reference
    a32 = tuple(v.float() if v.is_floating_point() else v for v in a)
    t32 = csr_transpose(a32, 18)
    x32 = x.detach().float().requires_grad_()
    g = torch.randn(25, 6)
    (csr_spmm(a32, x32, t32) * g).sum().backward()
    xr = x.detach().clone().requires_grad_()
    (csr_spmm_ref(*a, xr) * g.double()).sum().backward()
    torch.testing.assert_close(x32.grad.double(), xr.grad, rtol=1e-5, atol=1e-5)


def test_opcheck():
    a = random_csr(30, 20, 0.2, seed=10)
    t = csr_transpose(a, 20)
    x = torch.randn(20, 12)
    torch.library.opcheck(ops.csr_spmm, (*a, x))
    torch.library.opcheck(ops.csr_spmm, (*a, x.requires_grad_(), *t))


def test_torch_compile():
    a = random_csr(30, 20, 0.2, seed=11)
    t = csr_transpose(a, 20)
    x = torch.randn(20, 8, requires_grad=True)

    def f(x):
        return torch.relu(csr_spmm(a, x, t)).sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    out = compiled(x)
    out.backward()
    grad = x.grad.clone()
    x.grad = None
    f(x).backward()
    assert torch.equal(out, f(x)) and torch.equal(grad, x.grad)


def _call(**over):
    crow, col, val = random_csr(6, 5, 0.5, seed=12)
    args = dict(crow=crow, col=col, val=val, x=torch.randn(5, 4), t_crow=None, t_col=None, t_val=None)
    args.update(over)
    return ops.csr_spmm(**args)


@pytest.mark.parametrize("over,message", [
    (dict(col=torch.tensor([0, 9, 1])), "val must have one value per entry of col"),
    (dict(x=torch.randn(5, 4).long()), "x must be float32 or float64"),
    (dict(x=torch.randn(5, 4, 2)), "x must be 2-D"),
    (dict(x=torch.randn(4, 5).T), "x must be contiguous"),
    (dict(crow=torch.tensor([0, 1], dtype=torch.int32)), "crow must have dtype Long"),
    (dict(val=torch.randn(3, dtype=torch.float64)), "val must have dtype Float"),
])
def test_bad_input_is_a_clear_error(over, message):
    with pytest.raises(RuntimeError, match=message):
        _call(**over)


def test_bad_structure_is_a_clear_error():
    x = torch.randn(4, 3)
    val = torch.ones(3)
    with pytest.raises(RuntimeError, match=r"col out of range: column indices must lie in \[0, 4\)"):
        ops.csr_spmm(torch.tensor([0, 2, 3]), torch.tensor([1, 4, 0]), val, x)
    with pytest.raises(RuntimeError, match=r"col out of range"):
        ops.csr_spmm(torch.tensor([0, 2, 3]), torch.tensor([1, -1, 0]), val, x)
    with pytest.raises(RuntimeError, match="col out of range"):  # d = 0 reads nothing but still checks
        ops.csr_spmm(torch.tensor([0, 2, 3]), torch.tensor([1, 7, 0]), val, torch.randn(4, 0))
    with pytest.raises(RuntimeError, match="crow must be non-decreasing"):
        ops.csr_spmm(torch.tensor([0, 3, 2, 3]), torch.tensor([1, 2, 0]), val, x)
    with pytest.raises(RuntimeError, match="crow must run from 0 to the number of nonzeros"):
        ops.csr_spmm(torch.tensor([0, 1, 2]), torch.tensor([1, 2, 0]), val, x)
    a = (torch.tensor([0, 2, 3]), torch.tensor([1, 3, 0]), val)
    with pytest.raises(RuntimeError, match="must be given together"):
        ops.csr_spmm(*a, x, torch.tensor([0, 1, 2, 3, 3]), None, None)
    with pytest.raises(RuntimeError, match=r"t_crow must have x.size\(0\) \+ 1 = 5"):
        ops.csr_spmm(*a, x, torch.tensor([0, 3, 3]), torch.tensor([0, 1, 0]), val)


def test_autograd_misuse_is_a_clear_error():
    a = random_csr(6, 5, 0.5, seed=13)
    with pytest.raises(ValueError, match="x requires grad, so the transpose"):
        csr_spmm(a, torch.randn(5, 3, requires_grad=True))
    with pytest.raises(ValueError, match="val must not require grad"):
        csr_spmm((a[0], a[1], a[2].clone().requires_grad_()), torch.randn(5, 3), csr_transpose(a, 5))
    with pytest.raises(ValueError, match="col must lie in"):
        csr_transpose(a, 2)


def test_propagation_fused_and_torch_agree(monkeypatch):
    """`BipartiteAdjacency.step` on the package op (the CPU default) and on `torch.sparse.mm` (SPMM_IMPL="torch",
    the benchmarks' plain twin): same values and gradients up to fp32 rounding; an unknown SPMM_IMPL is refused."""
    from mbrec_fast.models import lightgcn
    gen = torch.Generator().manual_seed(14)
    users, items = torch.randint(0, 40, (300,), generator=gen), torch.randint(0, 30, (300,), generator=gen)
    adj = lightgcn.BipartiteAdjacency(users, items, 40, 30)
    ue, ie = torch.randn(40, 16, generator=gen), torch.randn(30, 16, generator=gen)
    results = []
    for impl in ("fused", "torch"):
        monkeypatch.setattr(lightgcn, "SPMM_IMPL", impl)
        u, i = ue.clone().requires_grad_(), ie.clone().requires_grad_()
        pu, pi = lightgcn.lightgcn_propagate(adj, u, i, 3)
        (pu.square().sum() + pi.sum()).backward()
        results.append((pu.detach(), pi.detach(), u.grad, i.grad))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    monkeypatch.setattr(lightgcn, "SPMM_IMPL", "dense")
    with pytest.raises(ValueError, match="SPMM_IMPL must be one of"):
        adj.step(ue, ie)


@pytest.mark.gpu
def test_cuda_kernel_matches_cpu_bit_for_bit():
    """The CUDA kernel runs the CPU's FMA chain (spmm_core.h): the same bits, forward and backward; bad column
    indices are an error there too."""
    for dtype in (torch.float32, torch.float64):
        a = random_csr(3000, 2000, 0.01, seed=15, dtype=dtype, duplicates=True)
        t = csr_transpose(a, 2000)
        x = torch.randn(2000, 70, dtype=dtype)
        ac, tc = tuple(v.cuda() for v in a), tuple(v.cuda() for v in t)
        xc = x.cuda().requires_grad_()
        y = csr_spmm(ac, xc, tc)
        assert torch.equal(y.cpu(), csr_spmm(a, x))
        g = torch.randn_like(y)
        y.backward(g)
        assert torch.equal(xc.grad.cpu(), csr_spmm(t, g.cpu()))
    with pytest.raises(RuntimeError, match="col out of range"):
        ops.csr_spmm(torch.tensor([0, 2, 3]).cuda(), torch.tensor([1, 4, 0]).cuda(), torch.ones(3).cuda(),
                     torch.randn(4, 3).cuda())
