"""Shared fixtures: the tiny model, tiny images, and the CIFAR-10 JPEGs of ../shared when present."""

from __future__ import annotations

import os
import tarfile
from pathlib import Path

import pytest
import torch

# No test may touch the network: the hub client and our downloader see offline mode.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("COATVIT_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"


@pytest.fixture
def tiny_model():
    torch.manual_seed(0)
    import coatvit

    return coatvit.create_model("coat_test").eval()


@pytest.fixture(scope="session")
def cifar10_dir(tmp_path_factory) -> Path:
    """CIFAR-10 as JPEGs in ImageFolder layout (cifar10/train, cifar10/test); skips when ../shared is absent."""
    if not SHARED_DATA.is_file():
        pytest.skip(f"real data not available: {SHARED_DATA} is absent (a clone outside the project workspace)")
    root = tmp_path_factory.mktemp("cifar")
    with tarfile.open(SHARED_DATA) as tar:
        tar.extractall(root, filter="data")
    return root / "cifar10"
