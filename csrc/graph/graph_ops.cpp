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
}
