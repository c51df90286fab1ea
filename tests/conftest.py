from pathlib import Path

import pytest
import torch

DATA = Path(__file__).parent / "data"
SHARED = Path(__file__).resolve().parents[2] / "shared"


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: takes tens of seconds or more; the README's test command runs it too "
                                       "(deselect with -m 'not slow')")


@pytest.fixture(scope="session")
def reference_cases():
    return torch.load(DATA / "reference_tiny.pt", weights_only=True)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A small synthetic ImageFolder (3 classes x 8 images per split) for the scripts' tests."""
    from umae_plugin.data import make_synthetic_imagefolder

    return make_synthetic_imagefolder(tmp_path_factory.mktemp("data"), num_classes=3, per_class=8)


@pytest.fixture
def tiny_kwargs():
    """A 32-px ViT small enough for CPU tests in milliseconds."""
    return dict(img_size=32, patch_size=4, embed_dim=64, depth=2, num_heads=4,
                decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=4)


MICRO = dict(patch_size=4, embed_dim=32, depth=1, num_heads=2, decoder_embed_dim=16, decoder_depth=1,
             decoder_num_heads=2)


@pytest.fixture(scope="session", autouse=True)
def micro_models():
    """`mae_vit_micro` / `umae_vit_micro` / `vit_micro`: scripts' end-to-end tests run in seconds."""
    from umae_plugin import models_mae, models_simmim, models_umae, models_vit
    from umae_plugin.registry import register

    def factory(cls, **kw):
        return cls(**{**MICRO, "img_size": 32, **kw})

    register("mae_vit_micro", lambda **kw: factory(models_mae.MaskedAutoencoderViT, **kw))
    register("umae_vit_micro", lambda **kw: factory(models_umae.UMAEViT, **kw))
    simmim = {k: v for k, v in MICRO.items() if not k.startswith("decoder")}
    register("simmim_vit_micro", lambda **kw: models_simmim.SimMIMViT(**{**simmim, "img_size": 32, **kw}))
    register("usimmim_vit_micro", lambda **kw: models_simmim.USimMIMViT(**{**simmim, "img_size": 32, **kw}))
    register("vit_micro", lambda **kw: models_vit.VisionTransformerClassifier(
        **{**{k: v for k, v in MICRO.items() if not k.startswith("decoder")}, "img_size": 32, "qkv_bias": True, **kw}))
