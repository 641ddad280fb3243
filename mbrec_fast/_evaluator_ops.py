"""The evaluator op family's Python side: fake (meta) implementations and thin call wrappers.

The C++ side: schemas in csrc/evaluator/evaluator_ops.cpp, CPU kernels in evaluator_cpu.cpp, CUDA kernels in
evaluator_cuda.cu; the pure-PyTorch reference is mbrec_fast/reference/evaluator.py. The ops return ranks and
metric values, which have no gradient, so the family registers no autograd. Everything here takes checked
arguments (the checks are mbrec_fast/evaluator.py's); the ops check again in C++.
"""
from __future__ import annotations

from typing import List

import torch

from . import _C  # noqa: F401  (registers the torch.ops.mbrec_fast schemas the fakes attach to)

# Columns of the rank_metrics values, in the kernels' order (csrc/common/rank_metrics.h).
METRICS = ("hr", "ndcg", "recall", "precision", "mrr")


# ----------------------------------------------------------------------------------------------
# Fakes: output shapes and dtypes from the inputs, for tracing (torch.compile, FakeTensor).

@torch.library.register_fake("mbrec_fast::topk_dot")
def _topk_dot_fake(user_emb, item_emb, users, excl_indptr, excl_indices, k, block_users, block_items):
    b = users.shape[0]
    return user_emb.new_empty((b, k), dtype=torch.float32), user_emb.new_empty((b, k), dtype=torch.int64)


@torch.library.register_fake("mbrec_fast::topk_merge")
def _topk_merge_fake(block_scores, users, item_start, excl_indptr, excl_indices, top_scores, top_ids):
    return torch.empty_like(top_scores), torch.empty_like(top_ids)


@torch.library.register_fake("mbrec_fast::rank_metrics")
def _rank_metrics_fake(top_ids, users, tgt_indptr, tgt_indices, tgt_groups, n_groups, ks):
    b = top_ids.shape[0]
    return (top_ids.new_empty((n_groups + 1, b, len(ks), len(METRICS)), dtype=torch.float64),
            top_ids.new_empty((n_groups + 1, b), dtype=torch.int64))


# ----------------------------------------------------------------------------------------------
# Call wrappers: CSR pairs (indptr, indices) unpacked into the ops' flat arguments.

def topk_dot(user_emb, item_emb, users, exclude, k: int, block_users: int, block_items: int,
             adapt_users: bool = False):
    """Top-k items by dot product for rows `users` (scores [b, k] fp32, ids [b, k] int64)."""
    if adapt_users and user_emb.device.type == "cpu":
        # give every thread a user block when there are few users
        threads = max(1, torch.get_num_threads())
        block_users = max(1, min(block_users, -(-users.numel() // threads)))
    return torch.ops.mbrec_fast.topk_dot(user_emb, item_emb, users, exclude[0], exclude[1], k, block_users, block_items)


def topk_merge(block_scores, users, item_start: int, exclude, top_scores, top_ids):
    """The running top-k lists with one block of scores (items item_start + j) merged in."""
    return torch.ops.mbrec_fast.topk_merge(block_scores, users, item_start, exclude[0], exclude[1], top_scores, top_ids)


def rank_metrics(top_ids, users, targets, groups, n_groups: int, ks: List[int]):
    """Per-user metric values [n_groups + 1, b, len(ks), 5] (float64) and distinct-target counts [n_groups + 1, b]."""
    return torch.ops.mbrec_fast.rank_metrics(top_ids, users, targets[0], targets[1], groups, n_groups, ks)
