"""Shared fixtures: the committed tiny bundle and the location of ../shared."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"
SHARED = ROOT.parent / "shared"


@pytest.fixture(scope="session")
def tiny_bundle_dir() -> Path:
    """The committed tiny INT8 bundle (made by tests/make_tiny_checkpoint.py)."""
    path = Path(os.environ.get("TINY_BUNDLE", FIXTURES / "tiny_bundle"))
    if not (path / "manifest.json").is_file():
        pytest.skip(f"tiny bundle fixture missing at {path}: run python tests/make_tiny_checkpoint.py")
    return path


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """../shared (data and the real bert-base-chinese config); skip when absent."""
    if not SHARED.is_dir():
        pytest.skip(f"{SHARED} is not present (the shared data folder is beside the repo in CI)")
    return SHARED


@pytest.fixture(scope="session")
def tiny_fp32_bundle_dir() -> Path:
    """The FP32 twin of the tiny bundle: exact comparisons (INT8 dynamic quantization
    scales activations per batch, so its logits move slightly with batch contents)."""
    path = FIXTURES / "tiny_bundle-fp32"
    if not (path / "manifest.json").is_file():
        pytest.skip(f"FP32 tiny bundle fixture missing at {path}: run python tests/make_tiny_checkpoint.py")
    return path


def _fixture_bundle(name: str) -> Path:
    path = FIXTURES / name
    if not (path / "manifest.json").is_file():
        pytest.skip(f"{name} fixture missing at {path}: run python tests/make_tiny_checkpoint.py --quantized")
    return path


@pytest.fixture(scope="session")
def tiny_static_bundle_dir() -> Path:
    """The static INT8 twin of the tiny bundle (activation scales fixed at build time)."""
    return _fixture_bundle("tiny_bundle-static")


@pytest.fixture(scope="session")
def tiny_int4_bundle_dir() -> Path:
    """The int4 weight-only twin of the tiny bundle (MatMulNBits, GatherBlockQuantized)."""
    return _fixture_bundle("tiny_bundle-int4")
