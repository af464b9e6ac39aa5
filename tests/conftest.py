"""Shared fixtures: real models, converted once from their PyPI packages and cached under .cache/."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def smollm2_dir():
    from hq_vllm.offline.model_io import cached_model_dir

    return cached_model_dir("smollm2")


@pytest.fixture(scope="session")
def qwen_dir():
    from hq_vllm.offline.model_io import cached_model_dir

    return cached_model_dir("qwen2.5-0.5b")
