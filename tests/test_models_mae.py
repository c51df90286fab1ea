import json
from functools import partial

import pytest
import torch
import torch.nn as nn

from umae_plugin import models_mae
from umae_plugin.pos_embed import sincos_2d
from umae_plugin.registry import create_model

from conftest import DATA

SPEC = json.loads((DATA / "official_state_dict_shapes.json").read_text())
LN = partial(nn.LayerNorm, eps=1e-6)


def shapes(model):
    return {k: list(v.shape) for k, v in model.state_dict().items()}


@pytest.mark.parametrize("name", ["mae_vit_base_patch16", "mae_vit_large_patch16", "mae_vit_huge_patch14"])
def test_state_dict_matches_official(name):
    with torch.device("meta"):
        model = create_model(name)
        alias = create_model(name + "_dec512d8b")
    assert shapes(model) == SPEC[name]
    assert shapes(alias) == SPEC[name]


@pytest.mark.parametrize("case", ["mae", "mae_norm_pix"])
def test_reproduces_reference_outputs(reference_cases, case):
    c = reference_cases[case]
    model = models_mae.MaskedAutoencoderViT(norm_layer=LN, **c["config"])
    model.load_state_dict(c["state_dict"], strict=True)
    model.eval()
    torch.manual_seed(c["forward_seed"])
    loss, pred, mask = model(c["imgs"], c["mask_ratio"])
    assert torch.equal(mask, c["mask"])
    torch.testing.assert_close(loss, c["loss"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(pred, c["pred"], rtol=1e-5, atol=1e-5)
    torch.manual_seed(c["forward_seed"])
    latent, mask2, ids_restore = model.forward_encoder(c["imgs"], c["mask_ratio"])
    assert torch.equal(ids_restore, c["ids_restore"])
    assert torch.equal(mask2, c["mask"])
    torch.testing.assert_close(latent, c["latent"], rtol=1e-5, atol=1e-5)
    assert torch.equal(model.patchify(c["imgs"]), c["patchified"])


def test_init_tables_equal_reference(reference_cases):
    sd = reference_cases["mae"]["state_dict"]
    torch.testing.assert_close(sincos_2d(64, 8, cls_token=True)[None], sd["pos_embed"], rtol=0, atol=0)
    torch.testing.assert_close(sincos_2d(32, 8, cls_token=True)[None], sd["decoder_pos_embed"], rtol=0, atol=0)


def test_init_scheme(tiny_kwargs):
    torch.manual_seed(0)
    model = models_mae.MaskedAutoencoderViT(**tiny_kwargs)
    w = model.patch_embed.proj.weight
    fan_in, fan_out = w[0].numel(), w.shape[0]
    bound = (6 / (fan_in + fan_out)) ** 0.5  # xavier-uniform on the projection viewed as a linear
    assert w.abs().max() <= bound and w.abs().max() > 0.9 * bound
    assert torch.all(model.blocks[0].attn.qkv.bias == 0)
    assert torch.all(model.norm.weight == 1)
    assert 0.005 < model.cls_token.std() < 0.05
    assert not model.pos_embed.requires_grad and not model.decoder_pos_embed.requires_grad


def test_factory_overrides():
    model = models_mae.mae_vit_tiny_patch16(img_size=32, patch_size=4)
    assert model.embed_dim == 192 and len(model.blocks) == 12 and model.patch_size == 4
    assert model.pos_embed.shape == (1, 65, 192)
    assert models_mae.mae_vit_small_patch16().embed_dim == 384


@pytest.mark.parametrize("ratio", [0.0, 0.5, 0.75, 0.9])
def test_masking_keeps_expected_count(tiny_kwargs, ratio):
    model = models_mae.MaskedAutoencoderViT(**tiny_kwargs)
    x = torch.randn(5, 64, 8)
    kept, mask, ids_restore = model.random_masking(x, ratio)
    keep = int(64 * (1 - ratio))
    assert kept.shape == (5, keep, 8)
    assert torch.all(mask.sum(1) == 64 - keep)
    # every kept token is the input token at a position the mask marks as kept
    for n in range(5):
        kept_pos = (mask[n] == 0).nonzero().flatten()
        assert sorted(map(tuple, kept[n].tolist())) == sorted(map(tuple, x[n, kept_pos].tolist()))
    assert torch.equal(torch.sort(ids_restore, 1).values, torch.arange(64).expand(5, -1))


def test_loss_only_on_removed_patches(tiny_kwargs):
    torch.manual_seed(0)
    model = models_mae.MaskedAutoencoderViT(**tiny_kwargs)
    imgs = torch.randn(2, 3, 32, 32)
    target = model.patchify(imgs)
    mask = torch.zeros(2, 64)
    mask[:, :16] = 1
    pred = torch.randn(2, 64, 48)
    pred_perfect_on_removed = pred.clone()
    pred_perfect_on_removed[:, :16] = target[:, :16]
    assert model.forward_loss(imgs, pred_perfect_on_removed, mask) == 0
    expected = ((pred[:, :16] - target[:, :16]) ** 2).mean()
    torch.testing.assert_close(model.forward_loss(imgs, pred, mask), expected)


def test_patchify_round_trip(tiny_kwargs):
    model = models_mae.MaskedAutoencoderViT(**tiny_kwargs)
    imgs = torch.randn(3, 3, 32, 32)
    p = model.patchify(imgs)
    assert p.shape == (3, 64, 48)
    torch.testing.assert_close(p[0, 1], imgs[0, :, 0:4, 4:8].permute(1, 2, 0).reshape(-1))
    assert torch.equal(model.unpatchify(p), imgs)


def test_forward_backward_and_terms(tiny_kwargs):
    model = models_mae.MaskedAutoencoderViT(**tiny_kwargs)
    loss, pred, mask, terms = model(torch.randn(4, 3, 32, 32), 0.75, return_terms=True)
    loss.backward()
    assert "loss_unif" not in terms and terms["features"].shape == (4, 64)
    assert terms["loss_mae"] is loss
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert all(model.get_parameter(n).grad is not None for n in trainable)


def test_grad_checkpointing_same_gradients(tiny_kwargs):
    torch.manual_seed(0)
    model = models_mae.MaskedAutoencoderViT(**tiny_kwargs)
    imgs = torch.randn(2, 3, 32, 32)
    grads = []
    for ckpt in (False, True):
        model.zero_grad()
        model.set_grad_checkpointing(ckpt)
        torch.manual_seed(1)
        model(imgs)[0].backward()
        grads.append(model.blocks[0].attn.qkv.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1])


def test_forward_features_is_unmasked_mean(tiny_kwargs):
    model = models_mae.MaskedAutoencoderViT(**tiny_kwargs).eval()
    imgs = torch.randn(2, 3, 32, 32)
    latent, _, _ = model.forward_encoder(imgs, 0.0)  # ratio 0 keeps every patch (shuffled)
    torch.testing.assert_close(model.forward_features(imgs), latent[:, 1:].mean(1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model.forward_features(imgs, pool="cls"), latent[:, 0], rtol=1e-5, atol=1e-5)


def test_noise_gives_the_mask_and_draws_nothing(tiny_kwargs):
    """HF transformers' `noise`: the `int(L * (1 - ratio))` patches of lowest noise are kept (the mask,
    written out here from the ranks), the latent holds them in noise order, and no random number is
    drawn; without it the draw is the reference's (test_reproduces_reference_outputs)."""
    torch.manual_seed(0)
    model = models_mae.MaskedAutoencoderViT(**tiny_kwargs).eval()
    imgs = torch.randn(2, 3, 32, 32)
    noise = torch.rand(2, 64)
    keep = int(64 * (1 - 0.75))
    expected = (noise.argsort(1).argsort(1) >= keep).float()  # rank of each patch's noise; 1 = removed
    state = torch.get_rng_state()
    loss, pred, mask = model(imgs, 0.75, noise=noise)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(mask, expected)
    latent, mask2, ids_restore = model.forward_encoder(imgs, 0.75, noise=noise)
    assert torch.equal(mask2, expected) and torch.equal(ids_restore, noise.argsort(1).argsort(1))
    order = noise.argsort(1)[:, :keep]  # kept patches, lowest noise first
    tokens = model.patch_embed(imgs) + model.pos_embed[:, 1:]
    full = model._encode_tokens(torch.gather(tokens, 1, order[..., None].expand(-1, -1, tokens.shape[-1])))
    torch.testing.assert_close(latent, full, rtol=0, atol=0)
    torch.manual_seed(1)
    drawn = model(imgs, 0.75)[2]
    torch.manual_seed(1)
    assert torch.equal(model(imgs, 0.75, noise=torch.rand(2, 64))[2], drawn)  # noise = the draw it replaces
    with pytest.raises(ValueError, match=r"noise has shape \(2, 63\); expected \[N, L\] = \[2, 64\]"):
        model(imgs, 0.75, noise=torch.rand(2, 63))
