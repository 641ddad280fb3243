"""The model registry: every model name the package trains, with its family, a one-line description and
what builds it. The CLI (help and dispatch), checkpoint lookup and each training family read this table.

A leaf module (it imports nothing of the package), so any module may import it without a circle. A
family is the training module `mbrec_fast.training.<family>`, which exposes `train_main(argv)` and
`evaluate_main(argv)`. `builder` names, as "module:attribute", what constructs the model: for the
multi-behavior family a `MultiBehaviorModel` subclass (built with its `from_data`), for the
multi-domain family the `build_model(name, data, ...)` factory, for the sequential family the
`build_model(args, data)` of its training module (SASRec's class depends on --setting).
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

__all__ = ["ModelEntry", "FAMILIES", "MODELS", "ALIASES", "resolve", "model_names", "family_module", "family_of",
           "load_builder"]


@dataclass(frozen=True)
class ModelEntry:
    """One trainable model: its CLI name, family, one-line description and builder ("module:attribute")."""

    name: str
    family: str
    description: str
    builder: str
    #: multi-domain only: built per (domain, task) already or MDMT by design (no --setting mtl / mdl)
    mdmt_only: bool = False


# family -> title shown by `mbrec-fast train --help` (the order of the help)
FAMILIES: Dict[str, str] = {
    "multibehavior": "multi-behavior (data: beibei, retailrocket, tmall, a table, synthetic:UxI)",
    "multidomain": "multi-domain multi-task CTR (data: ml100k, synthetic, movielens, kuairand, a table)",
    "sequential": "cross-domain sequential (data: amazon_toys_games, synthetic, amazon, a log)",
}

_MB, _MD, _SQ = "mbrec_fast.models.", "mbrec_fast.models.multidomain:build_model", "mbrec_fast.training.sequential:build_model"
_ENTRIES = (
    ModelEntry("bpr", "multibehavior", "BPR matrix factorization on the target behavior (alias: mf)",
               _MB + "baselines:BPRMF"),
    ModelEntry("neumf", "multibehavior", "NeuMF (GMF + MLP) on the target behavior", _MB + "baselines:NeuMF"),
    ModelEntry("mcbpr", "multibehavior", "multi-channel BPR over every behavior, level-aware negatives",
               _MB + "baselines:MCBPR"),
    ModelEntry("lightgcn", "multibehavior", "LightGCN propagation over the target-behavior graph",
               _MB + "lightgcn:LightGCN"),
    ModelEntry("nmtr", "multibehavior", "NMTR: one NCF head per behavior, cascaded scores, multi-task loss",
               _MB + "nmtr:NMTR"),
    ModelEntry("member", "multibehavior", "MEMBER: visited / unvisited experts with hard gating",
               _MB + "member:MEMBER"),
    ModelEntry("m3oe", "multidomain", "M3oE: domain, task and shared experts fused by learned weights", _MD,
               mdmt_only=True),
    ModelEntry("m3rec", "multidomain", "M3REC: meta item-embedding generator + experts", _MD, mdmt_only=True),
    ModelEntry("mlp", "multidomain", "one MLP per (domain, task)", _MD, mdmt_only=True),
    ModelEntry("sharedbottom", "multidomain", "shared bottom MLP, one tower per task", _MD),
    ModelEntry("mmoe", "multidomain", "MMoE: shared experts, one softmax gate per task", _MD),
    ModelEntry("ple", "multidomain", "PLE: shared and task-specific experts, progressive extraction", _MD),
    ModelEntry("star", "multidomain", "STAR: star-topology layers shared x per-domain weights", _MD),
    ModelEntry("adatt", "multidomain", "AdaTT: task-specific and shared experts fused per (domain, task) head", _MD),
    ModelEntry("adatt-sp", "multidomain", "AdaTT-sp: AdaTT without the shared experts", _MD),
    ModelEntry("m2m", "multidomain", "M2M: scenario-conditioned meta experts and towers", _MD, mdmt_only=True),
    ModelEntry("syncrec", "sequential", "SyNCRec: single- and cross-domain experts, negative-transfer gaps",
               _SQ),
    ModelEntry("sasrec", "sequential", "SASRec, one per domain (--setting single) or merged (cross)", _SQ),
)

#: model name -> entry, in the order of the help
MODELS: Dict[str, ModelEntry] = {e.name: e for e in _ENTRIES}
#: other accepted spellings -> model name
ALIASES: Dict[str, str] = {"mf": "bpr"}


def resolve(name: str) -> Optional[ModelEntry]:
    """The entry of a model name or alias (case-insensitive); None when unknown."""
    key = str(name).lower()
    return MODELS.get(ALIASES.get(key, key))


def model_names(family: Optional[str] = None, aliases: bool = False) -> Tuple[str, ...]:
    """Model names of one family (None: all), in registry order; with aliases=True their aliases too."""
    names = [n for n, e in MODELS.items() if family is None or e.family == family]
    if aliases:
        names += [a for a, n in ALIASES.items() if n in names]
    return tuple(names)


def family_module(family: str) -> str:
    """The training module of a family (exposes train_main and evaluate_main)."""
    return f"mbrec_fast.training.{family}"


def family_of(name: str) -> Optional[str]:
    """The training module that trains model `name` (an alias works too); None when unknown."""
    entry = resolve(name)
    return None if entry is None else family_module(entry.family)


def load_builder(name: str):
    """Imports and returns what builds model `name` (see the module docstring)."""
    entry = resolve(name)
    if entry is None:
        raise KeyError(f"unknown model {name!r} (one of {', '.join(model_names(aliases=True))})")
    module, attribute = entry.builder.split(":")
    return getattr(importlib.import_module(module), attribute)
