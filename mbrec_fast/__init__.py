"""mbrec_fast: fused PyTorch ops for multi-behavior, multi-domain and multi-task MoE recommenders.

Three op families, each a set of `torch.ops.mbrec_fast.*` custom operators with CPU and CUDA
kernels, fake (meta) implementations and a pure-PyTorch reference in `mbrec_fast.reference`:

* full-ranking evaluation and top-K retrieval (`evaluate_full_ranking`, `topk`);
* cascade-aware negative sampling (`InteractionGraph` and its samplers);
* gated and routed expert layers (`gated_experts`, `routed_experts`, modules in `mbrec_fast.nn`);

and the graph product the graph models propagate with (`csr_spmm`, in `mbrec_fast.graph`).
"""
import torch  # noqa: F401  (must load libtorch before the extension)
from . import _C  # noqa: F401  (loads the shared object, which registers torch.ops.mbrec_fast)
from .evaluator import *  # noqa: F401,F403
from .sampler import *  # noqa: F401,F403
from .experts import *  # noqa: F401,F403
from .graph import *  # noqa: F401,F403
from .batching import TripleBatches
from . import evaluator, sampler, experts, graph

NegativeSampler = TripleBatches  # its first name

__version__ = "0.1.0"
__all__ = evaluator.__all__ + sampler.__all__ + experts.__all__ + graph.__all__ + ["TripleBatches", "NegativeSampler"]


def cuda_built() -> bool:
    """True when this build contains the CUDA kernels."""
    import torch
    return bool(torch.ops.mbrec_fast.cuda_built())
