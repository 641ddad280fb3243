// Schemas of the sampler op family (kernels: sampler_cpu.cpp, sampler_cuda.cu; fakes and call wrappers:
// mbrec_fast/_sampler_ops.py).
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(mbrec_fast, m) {
  // Packed multi-behavior graph from COO arrays: indptr int64 [R + 2, n_users + 1] (global offsets; slots
  // 0..R-1 behaviors, R touched union, R+1 auxiliary union) and int32 indices, rows sorted and deduplicated.
  m.def("build_interaction_graph(Tensor users, Tensor items, Tensor behaviors, int n_users, int n_items, "
        "int n_behaviors) -> (Tensor, Tensor)");
  // num_neg negatives per (user, behavior) row; -1 where the allowed set has no (more) items.
  m.def("sample_negatives(Tensor indptr, Tensor indices, Tensor users, Tensor behaviors, Tensor level_thresholds, "
        "Tensor alias_threshold, Tensor alias_index, Tensor weights_q, Tensor weight_prefix, int n_items, "
        "int num_neg, int mode, bool replacement, int seed, int offset) -> Tensor");
  // num_neg negatives per position of a padded sequence batch: [B, L, num_neg].
  m.def("sample_sequence_negatives(Tensor excl, Tensor excl_len, Tensor pos_domain, Tensor dom_indptr, "
        "Tensor dom_items, int n_items, int num_neg, int pad, int seed, int offset) -> Tensor");
}
