"""The sampler op family's Python side: fake (meta) implementations and thin call wrappers.

The C++ side: schemas in csrc/sampler/sampler_ops.cpp, CPU kernels in sampler_cpu.cpp, CUDA kernels in
sampler_cuda.cu; the pure-PyTorch reference is mbrec_fast/reference/sampler.py. The ops return integer ids,
which have no gradient, so the family registers no autograd. Everything here takes checked arguments (the
checks are mbrec_fast/sampler.py's); the ops check again in C++.
"""
from __future__ import annotations

import torch

from . import _C  # noqa: F401  (registers the torch.ops.mbrec_fast schemas the fakes attach to)


# ----------------------------------------------------------------------------------------------------------
# Fakes: output shapes and dtypes from the inputs, for tracing (torch.compile, FakeTensor).

@torch.library.register_fake("mbrec_fast::sample_negatives")
def _sample_negatives_fake(indptr, indices, users, behaviors, level_thresholds, alias_threshold, alias_index,
                           weights_q, weight_prefix, n_items, num_neg, mode, replacement, seed, offset):
    torch._check(users.dim() == 1)
    return users.new_empty((users.shape[0], num_neg), dtype=torch.int64)


@torch.library.register_fake("mbrec_fast::sample_sequence_negatives")
def _sample_sequence_negatives_fake(excl, excl_len, pos_domain, dom_indptr, dom_items, n_items, num_neg, pad,
                                    seed, offset):
    return pos_domain.new_empty((pos_domain.shape[0], pos_domain.shape[1], num_neg), dtype=torch.int64)


@torch.library.register_fake("mbrec_fast::build_interaction_graph")
def _build_interaction_graph_fake(users, items, behaviors, n_users, n_items, n_behaviors):
    nnz = torch.library.get_ctx().new_dynamic_size()
    return (users.new_empty((n_behaviors + 2, n_users + 1), dtype=torch.int64),
            users.new_empty((nnz,), dtype=torch.int32))


# ----------------------------------------------------------------------------------------------------------
# Call wrappers

def build_interaction_graph(users, items, behaviors, n_users: int, n_items: int, n_behaviors: int):
    """Packed graph storage (indptr int64 [R + 2, n_users + 1], indices int32) from int64 COO ids (CPU op)."""
    return torch.ops.mbrec_fast.build_interaction_graph(users.cpu().contiguous(), items.cpu().contiguous(),
                                                        behaviors.cpu().contiguous(), n_users, n_items, n_behaviors)


def sample_negatives(indptr, indices, users, behaviors, level_thresholds, popularity_tables, n_items: int,
                     num_neg: int, mode: int, replacement: bool, seed: int, offset: int):
    """num_neg negatives per (user, behavior) row, int64 [len(users), num_neg] (-1: no allowed item).
    popularity_tables: (alias threshold, alias index, quantized weights, their prefix sums), empty tensors
    for uniform draws."""
    return torch.ops.mbrec_fast.sample_negatives(indptr, indices, users, behaviors, level_thresholds,
                                                 *popularity_tables, n_items, num_neg, mode, replacement, seed, offset)


def sample_sequence_negatives(excl, excl_len, pos_domain, dom_indptr, dom_items, n_items: int, num_neg: int,
                              pad: int, seed: int, offset: int):
    """num_neg negatives per position of a padded sequence batch, int64 [B, L, num_neg]."""
    return torch.ops.mbrec_fast.sample_sequence_negatives(excl, excl_len, pos_domain, dom_indptr, dom_items, n_items,
                                                          num_neg, pad, seed, offset)
