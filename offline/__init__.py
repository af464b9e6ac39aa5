"""The offline half of hadaquant: load, fuse, rotate, calibrate, quantize, write, evaluate.

Imported as ``hq_vllm.offline``. May import torch, transformers, safetensors,
``hq_vllm.kernels`` and ``hq_vllm.format``; never vllm.
"""
