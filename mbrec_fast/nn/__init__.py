"""nn: the expert-module stack every model builds on, on the fused ops.

* `bank`: `ExpertBank` (one layer of E experts: gated mixes or per-sample routing), `RoutedMLP` (towers per route id)
  and the fused-vs-loop switch `expert_impl` (`set_expert_impl`);
* `experts`: multi-layer expert modules, each layer an `ExpertBank`: MMoE (`GatedExperts`), `CGC` / `PLE`, `RoutedExperts`, `DomainTaskExperts`
  (M3oE), `from_loop` to convert loop-style modules.

The loop-of-experts twins (``expert_impl="loop"``) live in `mbrec_fast.reference.experts`.
"""
from .bank import *  # noqa: F401,F403
from .experts import *  # noqa: F401,F403
from . import bank as _bank, experts as _experts

__all__ = list(_bank.__all__) + list(_experts.__all__)
