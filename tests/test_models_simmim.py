import pytest
import torch

import main_pretrain
from umae_plugin import checkpoint as ckpt
from umae_plugin.losses import uniformity_loss
from umae_plugin.models_mae import patchify
from umae_plugin.models_simmim import SimMIMViT, USimMIMViT, block_mask
from umae_plugin.models_vit import VisionTransformerClassifier
from umae_plugin.registry import create_model

KW = dict(img_size=32, patch_size=4, embed_dim=32, depth=1, num_heads=2)


def test_block_mask_counts_and_blocks():
    torch.manual_seed(0)
    mask = block_mask(5, (8, 8), 0.6, 2)
    assert torch.all(mask.sum(1) == 4 * 10)  # ceil(0.6 * 16) blocks of 2x2 patches
    grid = mask.view(5, 8, 8)
    blocks = grid.view(5, 4, 2, 4, 2)
    assert torch.all(blocks.amax((2, 4)) == blocks.amin((2, 4)))  # constant inside each aligned block
    with pytest.raises(ValueError, match="multiple of the mask block"):
        block_mask(1, (7, 7), 0.6, 2)


def test_loss_only_on_masked_pixels():
    torch.manual_seed(0)
    model = SimMIMViT(**KW)
    imgs = torch.randn(2, 3, 32, 32)
    target = patchify(imgs, 4)
    mask = torch.zeros(2, 64)
    mask[:, 10:30] = 1
    pred = torch.randn(2, 64, 48)
    perfect = pred.clone()
    perfect[mask.bool()] = target[mask.bool()]
    assert model.forward_loss(imgs, perfect, mask) == 0
    brute = sum((pred[n, l] - target[n, l]).abs().sum() for n in range(2) for l in range(64) if mask[n, l]) / (40 * 48)
    torch.testing.assert_close(model.forward_loss(imgs, pred, mask), brute)


def test_masked_patches_see_only_the_mask_token():
    torch.manual_seed(0)
    model = SimMIMViT(**KW).eval()
    mask = torch.zeros(1, 64)
    mask[:, :8] = 1
    a, b = torch.randn(1, 3, 32, 32), torch.randn(1, 3, 32, 32)
    b[..., 4:, :] = a[..., 4:, :]  # differ only in the first patch row, which is masked
    torch.testing.assert_close(model._encode(a, mask), model._encode(b, mask))


def step(model, imgs):
    model.zero_grad()
    torch.manual_seed(1)
    loss, _, _, terms = model(imgs, 0.6, return_terms=True)
    loss.backward()
    return loss, terms, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_lambda_zero_is_simmim_and_positive_adds_uniformity():
    torch.manual_seed(0)
    base = SimMIMViT(**KW)
    imgs = torch.randn(4, 3, 32, 32)
    loss_a, terms_a, grads_a = step(base, imgs)
    for lam in (0.0, 0.3):
        u = USimMIMViT(**KW, lambda_unif=lam)
        u.load_state_dict(base.state_dict(), strict=True)
        loss_b, terms_b, grads_b = step(u, imgs)
        if lam == 0:
            assert torch.equal(loss_a, loss_b) and "loss_unif" not in terms_b
            assert all(torch.equal(grads_a[k], grads_b[k]) for k in grads_a)
        else:
            torch.testing.assert_close(loss_b, loss_a + lam * uniformity_loss(terms_a["features"]))
            assert not torch.allclose(grads_a["blocks.0.attn.qkv.weight"], grads_b["blocks.0.attn.qkv.weight"])


def test_encoder_loads_into_classifier():
    torch.manual_seed(0)
    src = create_model("simmim_vit_tiny_patch16", img_size=32, patch_size=4).eval()
    dst = VisionTransformerClassifier(global_pool=False, img_size=32, patch_size=4, embed_dim=192, depth=12,
                                      num_heads=3, num_classes=10, qkv_bias=True).eval()
    report = ckpt.load_pretrained(dst, {"model": src.state_dict()})
    assert {"mask_token", "decoder_pred.weight"} <= set(report.ignored)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(dst.forward_features(x), src.forward_features(x, pool="cls"), rtol=1e-4, atol=1e-4)


def test_pretrain_script_runs_usimmim(tmp_path):
    args = main_pretrain.get_args_parser().parse_args([
        "--model", "usimmim_vit_micro", "--dataset", "digits", "--input_size", "32", "--epochs", "1",
        "--batch_size", "256", "--device", "cpu", "--num_workers", "0", "--output_dir", str(tmp_path),
        "--log_dir", str(tmp_path), "--erank_samples", "10"])
    stats = main_pretrain.main(args)
    assert args.mask_ratio == 0.6 and args.lambda_unif == 0.01
    assert {"train_loss_mim", "train_loss_unif"} <= set(stats)
