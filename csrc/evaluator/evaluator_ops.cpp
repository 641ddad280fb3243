// Schemas of the full-ranking evaluator op family (kernels: evaluator_cpu.cpp, evaluator_cuda.cu; fakes and call
// wrappers: mbrec_fast/_evaluator_ops.py).
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(mbrec_fast, m) {
  // Top-k items by dot product for rows `users` of user_emb, excluding each user's CSR row; the
  // users x items matrix is scored block by block (block_users x block_items) and never stored.
  // Returns (scores [b, k] fp32, ids [b, k] int64), best first, ties by lower id, (-inf, -1) padding.
  m.def("topk_dot(Tensor user_emb, Tensor item_emb, Tensor users, Tensor excl_indptr, Tensor excl_indices, "
        "int k, int block_users, int block_items) -> (Tensor, Tensor)");
  // Merges one block of scores (items item_start + j) into sorted top-k lists (top_scores, top_ids);
  // returns the new sorted lists. The score_fn path calls it once per item block.
  m.def("topk_merge(Tensor block_scores, Tensor users, int item_start, Tensor excl_indptr, Tensor excl_indices, "
        "Tensor top_scores, Tensor top_ids) -> (Tensor, Tensor)");
  // RecBole metrics of ranked lists top_ids [b, K] against the targets CSR, overall and per target
  // group: returns (values [n_groups + 1, b, len(ks), 5] fp64 in order hr, ndcg, recall, precision,
  // mrr; distinct-target counts [n_groups + 1, b] int64, 0 = user skipped for that group).
  m.def("rank_metrics(Tensor top_ids, Tensor users, Tensor tgt_indptr, Tensor tgt_indices, Tensor tgt_groups, "
        "int n_groups, int[] ks) -> (Tensor, Tensor)");
}
