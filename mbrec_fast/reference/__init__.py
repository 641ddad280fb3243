"""Pure-PyTorch reference implementations of every op. Slow and simple on purpose: the tests
compare the fused kernels against these."""
