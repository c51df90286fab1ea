import json

import pytest
import torch

from umae_plugin.models_vit import VisionTransformerClassifier
from umae_plugin.registry import create_model

from conftest import DATA

SPEC = json.loads((DATA / "official_state_dict_shapes.json").read_text())


@pytest.mark.parametrize("arch", ["base_patch16", "large_patch16", "huge_patch14"])
@pytest.mark.parametrize("pool", ["global_pool", "cls_token"])
def test_state_dict_matches_reference_classifier(arch, pool):
    with torch.device("meta"):
        model = create_model(f"vit_{arch}", num_classes=1000, global_pool=pool == "global_pool")
    assert {k: list(v.shape) for k, v in model.state_dict().items()} == SPEC[f"vit_{arch}_{pool}"]


@pytest.mark.parametrize("case", ["vit_global_pool", "vit_cls_token"])
def test_reproduces_reference_classifier(reference_cases, case):
    c = reference_cases[case]
    model = VisionTransformerClassifier(qkv_bias=True, **c["config"]).eval()
    model.load_state_dict(c["state_dict"], strict=True)
    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(c["imgs"]), c["features"], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model(c["imgs"]), c["logits"], rtol=1e-5, atol=1e-5)


def test_small_factories():
    assert create_model("vit_tiny_patch16", img_size=32, patch_size=4).embed_dim == 192
    assert create_model("vit_small_patch16").embed_dim == 384
    with pytest.raises(ValueError, match="unknown model"):
        create_model("vit_gigantic")
