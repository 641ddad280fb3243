// Schemas of the graph op family (kernels: graph_cpu.cpp, graph_cuda.cu; fake and autograd: mbrec_fast/_graph_ops.py).
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(mbrec_fast, m) {
  // y = A x for a sparse A in CSR (crow int64 [rows + 1], col int64 [nnz], val [nnz]) and a dense x [n, d] (fp32 or
  // fp64, val of x's dtype): y [rows, d], y[r] = sum over the row's nonzeros, in storage order, of val[k] * x[col[k]]
  // (one fused multiply-add per nonzero: the same value on every backend and thread count). The optional transpose
  // A^T (t_crow [n + 1], t_col, t_val) is not read by the forward; it is what the backward multiplies by
  // (dx = A^T dy, by this op with the roles swapped). Gradients flow to x only, never to val.
  m.def("csr_spmm(Tensor crow, Tensor col, Tensor val, Tensor x, Tensor? t_crow=None, Tensor? t_col=None, "
        "Tensor? t_val=None) -> Tensor");
  // Each row of x [n, d] (fp32 or fp64) scaled to unit L2 norm, as F.normalize(x, dim=-1, eps=eps) but multiplying
  // by 1 / max(norm, eps) (one rounding from F.normalize's division): y [n, d] and each row's unclamped norm [n],
  // which the backward reads. Sums in a fixed order (row_norm_core.h): the same bits on every backend.
  m.def("row_l2_normalize(Tensor x, float eps=1e-12) -> (Tensor, Tensor)");
  // dx of row_l2_normalize from the output gradient, the forward's y and norm: (g - y <g, y>) / max(norm, eps),
  // and g / eps on rows whose norm was at most eps.
  m.def("row_l2_normalize_backward(Tensor grad, Tensor y, Tensor norm, float eps=1e-12) -> Tensor");
}
