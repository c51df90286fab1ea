"""recon tool: un-normalisation of norm_pix predictions, the pasted column, and the PNG size."""
import argparse
import json
from functools import partial

import pytest
import torch
import torch.nn as nn
from PIL import Image

from umae_plugin.analysis import recon
from umae_plugin.analysis.__main__ import main as cli
from umae_plugin.models_mae import MaskedAutoencoderViT


def micro(norm_pix_loss):
    torch.manual_seed(0)
    return MaskedAutoencoderViT(img_size=32, patch_size=4, embed_dim=32, depth=1, num_heads=2, decoder_embed_dim=16,
                                decoder_depth=1, decoder_num_heads=2, norm_pix_loss=norm_pix_loss,
                                norm_layer=partial(nn.LayerNorm, eps=1e-6))


def save(model, path, with_args=True):
    obj = {"model": model.state_dict()}
    if with_args:
        obj["args"] = argparse.Namespace(model="mae_vit_tiny_patch16", input_size=32, patch_size=4, embed_dim=32,
                                         depth=1, num_heads=2, decoder_embed_dim=16, decoder_depth=1,
                                         decoder_num_heads=2, norm_pix_loss=model.norm_pix_loss, lambda_unif=0.0)
    torch.save(obj, path)


def test_unnormalize_pred():
    target = torch.randn(2, 4, 12) * torch.rand(2, 4, 1).add(0.5) + torch.randn(2, 4, 1)
    mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
    normed = (target - mean) / (var + 1e-6).sqrt()
    mask = torch.tensor([[0.0, 1, 1, 0], [1, 0, 1, 1]])
    # Oracle statistics give the patches back exactly.
    assert torch.allclose(recon.unnormalize_pred(normed, target, mask, "oracle"), target, atol=1e-5)
    got = recon.unnormalize_pred(normed, target, mask, "visible")
    vis = mask == 0
    assert torch.allclose(got[vis], target[vis], atol=1e-5)  # visible patches: their own statistics
    # Removed patch (0, 1): mean of visible patches 0 and 3's means, mean of their variances.
    est_mean = (mean[0, 0] + mean[0, 3]) / 2
    est_std = ((var[0, 0] + var[0, 3]) / 2 + 1e-6).sqrt()
    assert torch.allclose(got[0, 1], normed[0, 1] * est_std + est_mean, atol=1e-5)
    with pytest.raises(ValueError):
        recon.unnormalize_pred(normed, target, mask, "nope")


def test_reconstruct_pastes_visible_patches():
    model = micro(norm_pix_loss=False).eval()
    imgs = torch.randn(2, 3, 32, 32)
    res = recon.reconstruct(model, imgs, 0.75, seed=3)
    again = recon.reconstruct(model, imgs, 0.75, seed=3)
    assert torch.equal(res["mask"], again["mask"]) and res["mask"].sum(1).tolist() == [48, 48]
    keep = model.unpatchify(res["mask"].unsqueeze(-1).expand(-1, -1, 48)) == 0
    pasted = res["reconstruction + visible"]
    assert torch.equal(pasted[keep], imgs[keep])
    assert torch.equal(pasted[~keep], res["reconstruction"][~keep])
    # The loss on removed patches is the model's own loss for the same mask.
    loss = model.forward_loss(imgs, model.patchify(res["reconstruction"]), res["mask"])
    assert torch.allclose(res["loss"].mean(), loss, atol=1e-5)


def test_recon_cli_png_size(tmp_path):
    save(micro(norm_pix_loss=True), tmp_path / "ckpt.pth")
    out = tmp_path / "out"
    cli(["recon", "--checkpoint", str(tmp_path / "ckpt.pth"), "--dataset", "digits", "--num_images", "3",
         "--cell_px", "64", "--device", "cpu", "--output_dir", str(out)])
    img = Image.open(out / "recon.png")
    assert img.format == "PNG" and img.size == (4 * 64, 3 * 64 + recon.HEADER_PX)
    result = json.loads((out / "recon.json").read_text())
    assert result["norm_pix_loss"] and result["unnormalize"] == "visible" and len(result["images"]) == 3


def test_recon_refuses_encoder_only(tmp_path):
    sd = {k: v for k, v in micro(False).state_dict().items() if not k.startswith(("decoder", "mask_token"))}
    torch.save({"model": sd}, tmp_path / "enc.pth")
    with pytest.raises(SystemExit, match="no decoder"):
        cli(["recon", "--checkpoint", str(tmp_path / "enc.pth"), "--dataset", "digits", "--device", "cpu",
             "--output_dir", str(tmp_path / "out")])
