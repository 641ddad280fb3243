"""Triton kernels (installed as mbrec_fast.kernels). Import only where triton is installed."""
