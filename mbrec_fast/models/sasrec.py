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

__all__ = ["CausalEncoder", "StackedCausalEncoder", "fast_dropout", "SASRec", "PerDomainSASRec", "causal_mask", "sampled_softmax_loss", "histories_to_inputs"]

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


def fast_dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Inverted dropout (zero with probability p, scale the rest by 1 / (1 - p)), the maths of `F.dropout`, with
    the mask drawn as `rand >= p`: on CPU `F.dropout`'s Bernoulli draw is about 3x slower than a uniform draw."""
    if not training or p == 0.0:
        return x
    if p >= 1.0:
        return x * 0.0
    keep = torch.rand_like(x).ge_(p).mul_(1.0 / (1.0 - p))
    return x * keep


class StackedCausalEncoder(nn.Module):
    """E independent pre-norm causal transformer encoders of one shape (a group of SyNCRec experts), run as ONE
    batched computation: stacked weights [n_layers, E, ...], batched matmuls over the experts, attention on
    [E * B, heads, L, d_head].

    Per expert the maths is `CausalEncoder(dim, n_layers, n_heads, dropout, final_norm=False)` (torch's
    `TransformerEncoderLayer`, norm_first, GELU, feed-forward 2 * dim, dropout on the attention weights, after the
    attention and inside and after the feed-forward). `forward(x)` takes the input shared by every expert, [B, L, d],
    and returns the outputs expert-major, [E, B * L, d] (the layout of `mbrec_fast.gated_experts`, no copy);
    `forward_loop` is the one-expert-at-a-time twin through `F.multi_head_attention_forward` (the reference).
    Initialisation builds the E `CausalEncoder`s and stacks their parameters: the same random draws, in the same
    order, as a `ModuleList` of them. Checkpoints with the per-expert keys (`<e>.layers.<l>.self_attn...`) load.
    """

    # stacked name -> the TransformerEncoderLayer parameter it stacks
    LAYER_KEYS = {"ln1_weight": "norm1.weight", "ln1_bias": "norm1.bias",
                  "qkv_weight": "self_attn.in_proj_weight", "qkv_bias": "self_attn.in_proj_bias",
                  "out_weight": "self_attn.out_proj.weight", "out_bias": "self_attn.out_proj.bias",
                  "ln2_weight": "norm2.weight", "ln2_bias": "norm2.bias",
                  "ff1_weight": "linear1.weight", "ff1_bias": "linear1.bias",
                  "ff2_weight": "linear2.weight", "ff2_bias": "linear2.bias"}

    def __init__(self, n_experts: int, dim: int, n_layers: int = N_LAYERS, n_heads: int = N_HEADS,
                 dropout: float = DROPOUT, ff_mult: int = 2):
        super().__init__()
        if dim % n_heads:
            raise ValueError(f"dim ({dim}) must be divisible by n_heads ({n_heads})")
        self.n_experts, self.dim, self.n_layers, self.n_heads, self.p = n_experts, dim, n_layers, n_heads, dropout
        encoders = [CausalEncoder(dim, n_layers, n_heads, dropout, ff_mult, final_norm=False) for _ in range(n_experts)]
        shapes = {"ln1_weight": (dim,), "ln1_bias": (dim,), "qkv_weight": (3 * dim, dim), "qkv_bias": (3 * dim,),
                  "out_weight": (dim, dim), "out_bias": (dim,), "ln2_weight": (dim,), "ln2_bias": (dim,),
                  "ff1_weight": (ff_mult * dim, dim), "ff1_bias": (ff_mult * dim,),
                  "ff2_weight": (dim, ff_mult * dim), "ff2_bias": (dim,)}
        for name, key in self.LAYER_KEYS.items():
            value = torch.empty((n_layers, n_experts) + shapes[name])
            with torch.no_grad():
                for e, enc in enumerate(encoders):
                    for l, layer in enumerate(enc.layers):
                        value[l, e] = layer.get_parameter(key)
            self.register_parameter(name, nn.Parameter(value))

    def __len__(self) -> int:
        return self.n_experts

    def forward(self, x: torch.Tensor, keep: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Outputs [E, n, d] of every expert for the shared input x [B, L, d] at the n = B * L positions, or at
        the n positions where `keep` [B, L] is True (row-major order): a left-aligned prefix of every row, e.g. the
        non-padding tokens. The per-token parts (LayerNorms, projections, feed-forward) then run on those positions
        only, attention on a padded [E * B_g, heads, L_g, d_head] layout per group of rows of similar length (rows
        up to L/4, L/2 and L kept positions, each group cut to its longest row); with causal attention the kept
        positions' outputs are exactly those of the full computation (the others are never computed)."""
        B, L, d = x.shape
        E, H = self.n_experts, self.n_heads
        dh = d // H
        drop = self.training and self.p > 0
        if keep is None:
            h = x.reshape(1, B * L, d)   # residual stream; broadcast over the experts in the first layer
            groups, inverse = None, None
        else:
            h = x.reshape(B * L, d)[keep.flatten()][None]
            groups, inverse = _length_groups(keep)
        for l in range(self.n_layers):
            a = F.layer_norm(h, (d,)) * self.ln1_weight[l][:, None] + self.ln1_bias[l][:, None]   # [E, n, d]
            qkv = torch.baddbmm(self.qkv_bias[l][:, None], a, self.qkv_weight[l].transpose(1, 2))  # [E, n, 3d]
            if groups is None:
                att = self._attention(qkv, B, L, drop)
            else:  # per length group: its positions into a padded [B_g, L_g] layout (zeros elsewhere), and back
                parts = [self._attention(qkv.new_zeros(E, b_g * l_g, 3 * d).index_copy(1, slot, qkv.index_select(1, pos)),
                                         b_g, l_g, drop).index_select(1, slot)
                         for pos, slot, b_g, l_g in groups]
                att = (torch.cat(parts, 1) if len(parts) > 1 else parts[0]).index_select(1, inverse)
            o = torch.baddbmm(self.out_bias[l][:, None], att, self.out_weight[l].transpose(1, 2))
            h = h + fast_dropout(o, self.p, drop)
            a = F.layer_norm(h, (d,)) * self.ln2_weight[l][:, None] + self.ln2_bias[l][:, None]
            f = F.gelu(torch.baddbmm(self.ff1_bias[l][:, None], a, self.ff1_weight[l].transpose(1, 2)))
            f = torch.baddbmm(self.ff2_bias[l][:, None], fast_dropout(f, self.p, drop), self.ff2_weight[l].transpose(1, 2))
            h = h + fast_dropout(f, self.p, drop)
        return h.expand(E, -1, d) if self.n_layers == 0 else h

    def _attention(self, qkv: torch.Tensor, B: int, L: int, drop: bool) -> torch.Tensor:
        """Causal multi-head attention of every expert: qkv [E, B * L, 3d] (rows of L positions) -> [E, B * L, d]."""
        E, d, H = qkv.shape[0], qkv.shape[-1] // 3, self.n_heads
        dh = d // H
        q, k, v = qkv.view(E, B, L, 3, H, dh).permute(3, 0, 1, 4, 2, 5).reshape(3, E * B, H, L, dh).unbind(0)
        if drop:  # dropout on the attention weights: the explicit product (SDPA's CPU kernels have no dropout)
            scores = torch.matmul(q, k.transpose(-1, -2)) * dh ** -0.5 + causal_mask(L, qkv.device)
            att = torch.matmul(fast_dropout(torch.softmax(scores, -1), self.p, True), v)
        else:
            att = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return att.view(E, B, H, L, dh).permute(0, 1, 3, 2, 4).reshape(E, B * L, d)

    def forward_loop(self, x: torch.Tensor, keep: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The same outputs [E, n, d], one expert and one layer at a time through torch's functional multi-head
        attention on the whole padded input, then the kept positions (the reference of `forward`; its dropout masks
        are drawn differently)."""
        B, L, d = x.shape
        mask = causal_mask(L, x.device)
        outs = []
        for e in range(self.n_experts):
            h = x.transpose(0, 1)        # [L, B, d], the layout of F.multi_head_attention_forward
            for l in range(self.n_layers):
                a = F.layer_norm(h, (d,), self.ln1_weight[l, e], self.ln1_bias[l, e])
                att, _ = F.multi_head_attention_forward(
                    a, a, a, d, self.n_heads, self.qkv_weight[l, e], self.qkv_bias[l, e], None, None, False,
                    self.p, self.out_weight[l, e], self.out_bias[l, e], training=self.training, need_weights=False,
                    attn_mask=mask)
                h = h + F.dropout(att, self.p, self.training)
                a = F.layer_norm(h, (d,), self.ln2_weight[l, e], self.ln2_bias[l, e])
                f = F.dropout(F.gelu(F.linear(a, self.ff1_weight[l, e], self.ff1_bias[l, e])), self.p, self.training)
                h = h + F.dropout(F.linear(f, self.ff2_weight[l, e], self.ff2_bias[l, e]), self.p, self.training)
            out = h.transpose(0, 1).reshape(B * L, d)
            outs.append(out if keep is None else out[keep.flatten()])
        n = B * L if keep is None else int(keep.sum())
        return torch.stack(outs) if outs else x.new_zeros(0, n, d)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        """Maps a checkpoint of per-expert `CausalEncoder`s (`<prefix><e>.layers.<l>.<param>`, the layout before the
        experts were stacked) onto the stacked parameters."""
        if prefix + "qkv_weight" not in state_dict:
            old = [k for k in state_dict if k.startswith(prefix) and k[len(prefix):].split(".", 1)[0].isdigit()]
            if old or self.n_experts == 0:  # (an empty group had no keys at all in that layout)
                for name, key in self.LAYER_KEYS.items():
                    parts = [[state_dict.get(f"{prefix}{e}.layers.{l}.{key}") for e in range(self.n_experts)]
                             for l in range(self.n_layers)]
                    if all(t is not None for row in parts for t in row):
                        state_dict[prefix + name] = (torch.stack([torch.stack(row) for row in parts])
                                                     if self.n_experts else getattr(self, name).detach().clone())
                for k in old:  # drop the mapped keys (anything else stays and is reported as unexpected)
                    e, rest = k[len(prefix):].split(".", 1)
                    fields = rest.split(".", 2)
                    if (int(e) < self.n_experts and len(fields) == 3 and fields[0] == "layers"
                            and int(fields[1]) < self.n_layers and fields[2] in self.LAYER_KEYS.values()):
                        del state_dict[k]
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)


def _length_groups(keep: torch.Tensor, cuts: Sequence[float] = (0.25, 0.5)):
    """Rows of a left-aligned keep mask [B, L] grouped by their kept length (up to cuts[0] * L, cuts[1] * L, L).
    Returns, per non-empty group, (pos: the group's kept positions in the row-major packed order, slot: the same
    positions in the group's padded [B_g, L_g] layout, B_g, L_g = the group's longest row), and the permutation
    that puts the groups' concatenated positions back in packed order."""
    B, L = keep.shape
    lengths = keep.sum(1)
    start = torch.cumsum(lengths, 0) - lengths                    # packed index of each row's first position
    bounds = [0] + sorted({max(1, int(c * L)) for c in cuts if int(c * L) < L}) + [L]
    groups, order = [], []
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        rows = torch.nonzero((lengths > lo) & (lengths <= hi)).flatten()
        if rows.numel() == 0:
            continue
        l_g = int(lengths[rows].max())
        sub = keep[rows, :l_g]
        slot = torch.nonzero(sub.flatten()).flatten()
        pos = (start[rows, None] + torch.arange(l_g, device=keep.device))[sub]
        groups.append((pos, slot, rows.numel(), l_g))
        order.append(pos)
    perm = torch.cat(order) if order else lengths.new_zeros(0)
    return groups, torch.argsort(perm)


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
