import pytest
import torch

from umae_plugin import checkpoint as ckpt
from umae_plugin.losses import coding_rate_loss, uniformity_loss
from umae_plugin.models_mae import MaskedAutoencoderViT
from umae_plugin.models_simmim import SimMIMViT, USimMIMViT
from umae_plugin.models_umae import UMAEViT, umae_vit_tiny_patch16
from umae_plugin.registry import build_pretrain_model, create_model, resolved_kwargs


def pair(tiny_kwargs, **umae_kwargs):
    torch.manual_seed(0)
    mae = MaskedAutoencoderViT(**tiny_kwargs)
    umae = UMAEViT(**tiny_kwargs, **umae_kwargs)
    umae.load_state_dict(mae.state_dict(), strict=True)
    return mae, umae


def step(model, imgs, seed=3):
    model.zero_grad()
    torch.manual_seed(seed)
    out = model(imgs, 0.75, return_terms=True)
    out[0].backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_same_state_dict_as_mae(tiny_kwargs):
    mae, umae = pair(tiny_kwargs)
    assert {k: v.shape for k, v in mae.state_dict().items()} == {k: v.shape for k, v in umae.state_dict().items()}


def test_lambda_zero_is_exactly_mae(tiny_kwargs):
    mae, umae = pair(tiny_kwargs, lambda_unif=0.0)
    imgs = torch.randn(4, 3, 32, 32)
    (loss_a, pred_a, mask_a, terms_a), grads_a = step(mae, imgs)
    (loss_b, pred_b, mask_b, terms_b), grads_b = step(umae, imgs)
    assert torch.equal(loss_a, loss_b) and torch.equal(pred_a, pred_b) and torch.equal(mask_a, mask_b)
    assert "loss_unif" not in terms_b
    assert grads_a.keys() == grads_b.keys()
    assert all(torch.equal(grads_a[k], grads_b[k]) for k in grads_a)


@pytest.mark.parametrize("pool", ["mean", "cls"])
def test_loss_is_mae_plus_lambda_uniformity(tiny_kwargs, pool):
    mae, umae = pair(tiny_kwargs, lambda_unif=0.5, unif_pool=pool)
    imgs = torch.randn(4, 3, 32, 32)
    (loss, _, _, terms), grads = step(umae, imgs)
    (loss_mae, _, _, _), grads_mae = step(mae, imgs)
    # second computation of the features: the same seeded encoder pass, pooled by hand
    torch.manual_seed(3)
    latent, _, _ = mae.forward_encoder(imgs, 0.75)
    feats = latent[:, 1:].mean(1) if pool == "mean" else latent[:, 0]
    torch.testing.assert_close(terms["features"], feats)
    torch.testing.assert_close(terms["loss_unif"], uniformity_loss(feats))
    torch.testing.assert_close(terms["loss_mae"], loss_mae)
    torch.testing.assert_close(loss, loss_mae + 0.5 * uniformity_loss(feats))
    assert not torch.allclose(grads["blocks.0.attn.qkv.weight"], grads_mae["blocks.0.attn.qkv.weight"])
    # the decoder does not see the uniformity term
    torch.testing.assert_close(grads["decoder_pred.weight"], grads_mae["decoder_pred.weight"])


def test_upstream_call_returns_three(tiny_kwargs):
    _, umae = pair(tiny_kwargs)
    out = umae(torch.randn(2, 3, 32, 32))
    assert len(out) == 3 and out[0].dim() == 0


def test_factories_and_validation():
    m = umae_vit_tiny_patch16(img_size=32, patch_size=4, lambda_unif=0.1, unif_pool="cls")
    assert m.lambda_unif == 0.1 and m.feature_pool == "cls" and m.embed_dim == 192
    assert isinstance(create_model("umae_vit_huge_patch14", img_size=28), UMAEViT)
    with pytest.raises(ValueError, match="lambda_unif"):
        UMAEViT(img_size=32, patch_size=4, embed_dim=64, depth=1, num_heads=4, lambda_unif=-1)
    with pytest.raises(ValueError, match="unif_pool"):
        UMAEViT(img_size=32, patch_size=4, embed_dim=64, depth=1, num_heads=4, unif_pool="max")


# ---------------------------------------------------------------------------------------------
# M-MAE's coding-rate term in place of the squared cosine (reg="TCR")


@pytest.mark.parametrize("centering", [False, True])
def test_tcr_loss_is_mae_plus_lambda_coding_rate(tiny_kwargs, centering):
    mae, mmae = pair(tiny_kwargs, lambda_unif=0.5, unif_pool="cls", reg="TCR", uniformity_mu=3.0, centering=centering)
    imgs = torch.randn(6, 3, 32, 32)
    (loss, _, _, terms), grads = step(mmae, imgs)
    (loss_mae, _, _, _), grads_mae = step(mae, imgs)
    torch.manual_seed(3)
    feats = mae.forward_encoder(imgs, 0.75)[0][:, 0]  # class token, pooled by hand
    expected = coding_rate_loss(feats, mu=3.0, centering=centering)
    assert "loss_unif" not in terms  # train_loss_unif keeps meaning the square term only
    torch.testing.assert_close(terms["loss_tcr"], expected)
    torch.testing.assert_close(loss, loss_mae + 0.5 * expected)
    assert not torch.allclose(grads["blocks.0.attn.qkv.weight"], grads_mae["blocks.0.attn.qkv.weight"])
    torch.testing.assert_close(grads["decoder_pred.weight"], grads_mae["decoder_pred.weight"])


def test_tcr_with_lambda_zero_is_exactly_mae_and_warns(tiny_kwargs, caplog):
    with caplog.at_level("WARNING"):
        mae, mmae = pair(tiny_kwargs, lambda_unif=0.0, reg="TCR", uniformity_mu=3.0)
    assert "TCR term has lambda_unif 0" in caplog.text
    imgs = torch.randn(4, 3, 32, 32)
    (loss_a, _, _, terms_a), grads_a = step(mae, imgs)
    (loss_b, _, _, terms_b), grads_b = step(mmae, imgs)
    assert torch.equal(loss_a, loss_b) and "loss_tcr" not in terms_b
    assert all(torch.equal(grads_a[k], grads_b[k]) for k in grads_a)


def test_usimmim_takes_the_term(tiny_kwargs):
    kw = {k: v for k, v in tiny_kwargs.items() if not k.startswith("decoder")}
    torch.manual_seed(0)
    plain = SimMIMViT(**kw)
    model = USimMIMViT(**kw, lambda_unif=0.1, reg="TCR", uniformity_mu=2.0)
    model.load_state_dict(plain.state_dict(), strict=True)
    imgs = torch.randn(4, 3, 32, 32)
    torch.manual_seed(5)
    loss, _, _, terms = model(imgs, 0.6, return_terms=True)
    torch.manual_seed(5)
    loss_mim = plain(imgs, 0.6)[0]
    torch.testing.assert_close(loss, loss_mim + 0.1 * coding_rate_loss(terms["features"], mu=2.0))


def test_term_recorded_in_model_args_and_rebuilt():
    model = build_pretrain_model("mae_vit_tiny_patch16", lambda_unif=0.01, unif_pool="cls", img_size=32, patch_size=4,
                                 reg="TCR", uniformity_mu=3.0, centering=True)
    record = resolved_kwargs(model)
    assert (record["reg"], record["uniformity_mu"], record["centering"]) == ("TCR", 3.0, True)
    rebuilt = ckpt.build_model(ckpt.model_args("umae_vit_tiny_patch16", record))
    assert (rebuilt.reg, rebuilt.uniformity_mu, rebuilt.centering, rebuilt.feature_pool) == ("TCR", 3.0, True, "cls")
    # a record written before the term existed rebuilds with U-MAE's square term
    old = {k: v for k, v in record.items() if k not in ("reg", "uniformity_mu", "centering")}
    assert ckpt.build_model(ckpt.model_args("umae_vit_tiny_patch16", old)).reg == "square"
    # lambda 0: the plain class, whatever the term's keywords say
    plain = build_pretrain_model("mae_vit_tiny_patch16", lambda_unif=0.0, img_size=32, patch_size=4, reg="TCR")
    assert type(plain) is MaskedAutoencoderViT and "reg" not in resolved_kwargs(plain)


def test_term_validation_and_gather_mode():
    kw = dict(img_size=32, patch_size=4, embed_dim=64, depth=1, num_heads=4)
    with pytest.raises(ValueError, match="unknown reg"):
        UMAEViT(**kw, reg="spectral")  # the U-MAE reference's alias is resolved by the command line
    for mu in (0.0, -1.0, float("inf"), True):
        with pytest.raises(ValueError, match="uniformity_mu"):
            UMAEViT(**kw, reg="TCR", uniformity_mu=mu)
    with pytest.raises(ValueError, match="centering"):
        UMAEViT(**kw, reg="TCR", centering="False")
    model = UMAEViT(**kw)
    assert model.unif_gather == "global"
    model.set_unif_gather("reference")
    assert model.unif_gather == "reference" and "unif_gather" not in resolved_kwargs(model)
    with pytest.raises(ValueError, match="unif_gather"):
        model.set_unif_gather("local")
