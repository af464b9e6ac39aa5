"""Kernels: Hadamard constructions, transforms, packing and quantization primitives.

Each kernel lives beside a plain-torch reference with the same signature. This package may
import torch and triton, and nothing else of ours.
"""
