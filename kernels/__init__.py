"""Triton kernels and their launchers (no autograd, no transformers). Installed as abft_fast.kernels."""
