"""Fused ops of tcopilot: one sub-package per op (api, reference oracle, torch path, Triton kernels)."""
