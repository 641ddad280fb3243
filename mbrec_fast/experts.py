"""experts op family (public API)."""
__all__ = []
