"""Tiny CPU fixtures for the models tests: built once per session, never mutated by a test."""

from __future__ import annotations

import os

import pytest
import torch

# No test may reach the hub; fail fast if something tries.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_pipeline():
    """The built-in tiny random pipeline (float32, CPU). Tests that add hooks must remove them."""
    from models.tiny import build_tiny_pipeline

    return build_tiny_pipeline(seed=0)


@pytest.fixture(scope="session")
def tiny_text_encoder(tiny_pipeline):
    """The tiny pipeline's CLIP text encoder (byte tokenizer, width 32)."""
    return tiny_pipeline.text_encoder


@pytest.fixture(scope="module")
def single_thread():
    """Run a test module with one intra-op thread.

    The tiny models' ops are far too small to gain from threads, and on a shared 2-core machine the
    second thread's spin-waiting made them ~7x slower (a 128 px generation took 1.5 s wall with 2
    threads vs 0.23 s with 1, under load).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
