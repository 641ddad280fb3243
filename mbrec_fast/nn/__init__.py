"""nn: modules built on the fused ops (expert layers: MMoE, CGC/PLE, routed experts, M3oE's domain/task experts)."""
from .experts import *  # noqa: F401,F403
from . import experts as _experts

__all__ = list(_experts.__all__)
