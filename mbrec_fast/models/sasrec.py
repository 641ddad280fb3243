"""SASRec (Kang & McAuley, 2018) and the sequence building blocks SyNCRec shares with it.

Token layout (see `mbrec_fast.data.sequences.make_training_windows`): items 0..N-1, PAD = N, SOS = N + 1. Inputs
are left-aligned and SOS-first, so a causal mask alone keeps every real position away from the padding that
follows it; the score of item i at a position is the dot product of the hidden state with item i's embedding.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["CausalEncoder", "SASRec", "PerDomainSASRec", "causal_mask", "sampled_softmax_loss", "histories_to_inputs"]

# the transformer shape SASRec and SyNCRec share, stated once (their signatures use these; the CLI reads them there)
DIM = 64         # embedding and transformer width
N_LAYERS = 2     # transformer layers per encoder
N_HEADS = 2      # attention heads
MAX_LEN = 50     # longest history window
DROPOUT = 0.2


def causal_mask(length: int, device=None) -> torch.Tensor:
    """Additive [L, L] mask: 0 on and below the diagonal, -inf above (position t sees 0..t only)."""
    return torch.triu(torch.full((length, length), float("-inf"), device=device), diagonal=1)


class CausalEncoder(nn.Module):
    """A stack of pre-norm transformer-encoder layers under a causal mask (one SyNCRec expert, or SASRec's body)."""

    def __init__(self, dim: int, n_layers: int = N_LAYERS, n_heads: int = N_HEADS, dropout: float = DROPOUT,
                 ff_mult: int = 2, final_norm: bool = True):
        super().__init__()
        self.layers = nn.ModuleList([
            nn.TransformerEncoderLayer(dim, n_heads, dim_feedforward=ff_mult * dim, dropout=dropout,
                                       activation="gelu", batch_first=True, norm_first=True)
            for _ in range(n_layers)])
        self.norm = nn.LayerNorm(dim) if final_norm else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mask = causal_mask(x.shape[1], x.device)
        for layer in self.layers:
            x = layer(x, src_mask=mask, is_causal=True)
        return self.norm(x)


def sampled_softmax_loss(hidden: torch.Tensor, item_emb: torch.Tensor, pos: torch.Tensor,
                         neg: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-position cross-entropy of the positive against its sampled negatives.

    hidden [..., d]; pos [...] (-1 = no target); neg [..., K] (-1 = no negative drawn, e.g. an empty pool).
    Returns (loss [...], valid mask [...]); loss is 0 where there is no target.
    """
    valid = pos >= 0
    p = item_emb[pos.clamp_min(0)]
    n = item_emb[neg.clamp_min(0)]
    pos_logit = (hidden * p).sum(-1, keepdim=True)
    neg_logit = torch.einsum("...d,...kd->...k", hidden, n).masked_fill(neg < 0, float("-inf"))
    logits = torch.cat([pos_logit, neg_logit], -1)
    loss = -F.log_softmax(logits, -1)[..., 0]
    return loss.masked_fill(~valid, 0.0), valid


def histories_to_inputs(histories: Sequence[torch.Tensor], max_len: int, n_items: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """[SOS, last max_len-1 history items, PAD...] per row, and the index of each row's last real position."""
    B = len(histories)
    PAD, SOS = n_items, n_items + 1
    tokens = torch.full((B, max_len), PAD, dtype=torch.int64)
    last = torch.zeros(B, dtype=torch.int64)
    tokens[:, 0] = SOS
    for b, h in enumerate(histories):
        h = h[-(max_len - 1):] if max_len > 1 else h[:0]
        tokens[b, 1:1 + h.numel()] = h
        last[b] = h.numel()
    return tokens, last


class SASRec(nn.Module):
    """Self-attentive sequential recommender: item + position (+ optional domain) embeddings, causal encoder,
    dot-product scores against the shared item table. Used per domain (single-domain baseline) and on the merged
    cross-domain sequence (cross-domain baseline)."""

    def __init__(self, n_items: int, n_domains: int = 1, item_domain: Optional[torch.Tensor] = None, dim: int = DIM,
                 n_layers: int = N_LAYERS, n_heads: int = N_HEADS, max_len: int = MAX_LEN, dropout: float = DROPOUT,
                 use_domain_emb: bool = True):
        super().__init__()
        self.n_items, self.n_domains, self.max_len, self.dim = n_items, n_domains, max_len, dim
        self.item_emb = nn.Embedding(n_items + 2, dim, padding_idx=n_items)
        self.pos_emb = nn.Embedding(max_len, dim)
        self.dom_emb = nn.Embedding(n_domains + 1, dim) if use_domain_emb else None
        dom = torch.zeros(n_items + 2, dtype=torch.int64) + n_domains
        if item_domain is not None:
            dom[:n_items] = item_domain
        self.register_buffer("token_domain", dom, persistent=False)
        self.dropout = nn.Dropout(dropout)
        self.encoder = CausalEncoder(dim, n_layers, n_heads, dropout)
        nn.init.normal_(self.item_emb.weight, std=dim ** -0.5)
        with torch.no_grad():
            self.item_emb.weight[n_items].zero_()

    @property
    def items(self) -> torch.Tensor:
        """Embeddings of the real items [N, d] (scoring table)."""
        return self.item_emb.weight[:self.n_items]

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.item_emb(tokens) * self.dim ** 0.5
        x = x + self.pos_emb(torch.arange(tokens.shape[-1], device=tokens.device))
        if self.dom_emb is not None:
            x = x + self.dom_emb(self.token_domain[tokens])
        return self.dropout(x)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Hidden states [B, L, d] for SOS-first token rows [B, L]."""
        return self.encoder(self.embed(tokens))

    def loss(self, tokens: torch.Tensor, targets: torch.Tensor, negatives: torch.Tensor) -> torch.Tensor:
        per_pos, valid = sampled_softmax_loss(self(tokens), self.item_emb.weight, targets, negatives)
        return per_pos.sum() / valid.sum().clamp_min(1)

    @torch.no_grad()
    def user_repr(self, histories: Sequence[torch.Tensor], batch_size: int = 1024) -> torch.Tensor:
        """Representation [B, d] predicting the item after each history (the last real position's state)."""
        out = []
        dev = self.item_emb.weight.device
        for s in range(0, len(histories), batch_size):
            tokens, last = histories_to_inputs(histories[s:s + batch_size], self.max_len, self.n_items)
            h = self(tokens.to(dev))
            out.append(h[torch.arange(h.shape[0], device=dev), last.to(dev)])
        return torch.cat(out) if out else torch.zeros(0, self.dim, device=dev)


class PerDomainSASRec(nn.Module):
    """One SASRec per domain (the single-domain baseline): model d is trained on, and predicts from, the user's
    domain-d subsequence only."""

    def __init__(self, n_items: int, n_domains: int, item_domain: torch.Tensor, **kwargs):
        super().__init__()
        self.n_items, self.n_domains = n_items, n_domains
        self.register_buffer("item_domain", torch.as_tensor(item_domain, dtype=torch.int64), persistent=False)
        self.models = nn.ModuleList([SASRec(n_items, n_domains, item_domain, **kwargs) for _ in range(n_domains)])

    @property
    def dim(self) -> int:
        return self.models[0].dim

    def loss(self, single_in: torch.Tensor, single_tgt: torch.Tensor, single_neg: torch.Tensor) -> torch.Tensor:
        """Sum over domains of each model's loss on its own subsequences ([B, D, L] inputs)."""
        total = single_in.new_zeros((), dtype=torch.float32)
        for d, m in enumerate(self.models):
            rows = torch.nonzero(single_tgt[:, d, 0] >= 0).flatten()
            if rows.numel():
                total = total + m.loss(single_in[rows, d], single_tgt[rows, d], single_neg[rows, d])
        return total

    @torch.no_grad()
    def user_repr(self, histories: Sequence[torch.Tensor], target_domains: torch.Tensor) -> torch.Tensor:
        """State of model d (d = the target's domain) after the history restricted to d."""
        out = torch.zeros(len(histories), self.dim, device=self.item_domain.device)
        for d, m in enumerate(self.models):
            rows = torch.nonzero(target_domains == d).flatten().tolist()
            if rows:
                hs = [histories[r][self.item_domain.cpu()[histories[r]] == d] for r in rows]
                out[rows] = m.user_repr(hs)
        return out
