from pathlib import Path

import pytest
import torch

DATA = Path(__file__).parent / "data"
SHARED = Path(__file__).resolve().parents[2] / "shared"


@pytest.fixture(scope="session")
def reference_cases():
    return torch.load(DATA / "reference_tiny.pt", weights_only=True)


@pytest.fixture
def tiny_kwargs():
    """A 32-px ViT small enough for CPU tests in milliseconds."""
    return dict(img_size=32, patch_size=4, embed_dim=64, depth=2, num_heads=4,
                decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=4)
