import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from umae_plugin import linprobe_cached
from umae_plugin.train_step import NonFiniteLossError
from umae_plugin.linprobe_cached import evaluate_head, extract_features, knn_accuracy, train_linear_head


def brute_force_knn_top1(train, train_labels, val, val_labels, k, temperature, num_classes):
    """DINO's weighted vote, one val sample at a time, with plain Python loops."""
    hits = 0
    for q, target in zip(val, val_labels):
        sims = [(float(F.cosine_similarity(q, t, dim=0)), int(c)) for t, c in zip(train, train_labels)]
        sims.sort(key=lambda s: -s[0])
        votes = [0.0] * num_classes
        for s, c in sims[:k]:
            votes[c] += torch.tensor(s / temperature).exp().item()
        hits += max(range(num_classes), key=lambda c: votes[c]) == int(target)
    return hits / len(val)


def test_knn_matches_brute_force():
    g = torch.Generator().manual_seed(0)
    train, val = torch.randn(60, 8, generator=g), torch.randn(25, 8, generator=g)
    train_labels, val_labels = torch.randint(0, 4, (60,), generator=g), torch.randint(0, 4, (25,), generator=g)
    for k, temperature in ((20, 0.07), (5, 1.0), (1, 0.07)):
        got = knn_accuracy(train, train_labels, val, val_labels, k=k, temperature=temperature, num_classes=4, chunk_size=7)
        expected = brute_force_knn_top1(train, train_labels, val, val_labels, k, temperature, 4)
        assert got["acc1"] == pytest.approx(expected), (k, temperature)
        assert got["acc1"] <= got["acc5"] == 1.0  # only 4 classes


def test_knn_on_separable_clusters_is_perfect():
    g = torch.Generator().manual_seed(0)
    centres = torch.eye(5, 16) * 10
    train_labels, val_labels = torch.arange(5).repeat(10), torch.arange(5).repeat(4)
    train = centres[train_labels] + torch.randn(50, 16, generator=g)
    val = centres[val_labels] + torch.randn(20, 16, generator=g)
    assert knn_accuracy(train, train_labels, val, val_labels) == {"acc1": 1.0, "acc5": 1.0}
    # k larger than the bank is capped: with k = N every sample votes, nearer ones weigh more
    assert knn_accuracy(train[:7], train_labels[:7], val, val_labels, k=100)["acc1"] == 1.0


class Features(nn.Module):
    """forward_features: a fixed linear map, so extracted features are known in advance."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 3)

    def forward_features(self, x):
        return self.proj(x)


def test_extract_features_in_dataset_order():
    torch.manual_seed(0)
    model = Features().train()
    x, y = torch.randn(11, 4), torch.arange(11)
    feats, labels = extract_features(model, DataLoader(TensorDataset(x, y), batch_size=4), torch.device("cpu"))
    with torch.no_grad():
        torch.testing.assert_close(feats, model.proj(x))
    assert torch.equal(labels, y) and model.training  # mode restored


def test_extract_features_gathers_shards_in_dataset_order(monkeypatch):
    """Two ranks, 11 samples: each rank extracts its padded shard (DistributedSampler) and gets
    all 11 back in dataset order. The all-gather is simulated: rank 1's shard is extracted here."""
    torch.manual_seed(0)
    model = Features()
    x, y = torch.randn(11, 4), torch.arange(11)
    dataset = TensorDataset(x, y)

    def shard_loader(rank):
        return DataLoader(dataset, batch_size=2, sampler=DistributedSampler(dataset, num_replicas=2, rank=rank, shuffle=False))

    rank1 = extract_features(model, shard_loader(1), torch.device("cpu"))  # one process: no gather
    assert len(rank1[1]) == 6 and rank1[1][-1] == 0  # padded with sample 0

    def all_gather(shards, tensor):
        shards[0].copy_(tensor)
        shards[1].copy_(rank1[0] if tensor.is_floating_point() else rank1[1])

    monkeypatch.setattr(linprobe_cached.distributed, "get_world_size", lambda: 2)
    monkeypatch.setattr(linprobe_cached.dist, "all_gather", all_gather)
    feats, labels = extract_features(model, shard_loader(0), torch.device("cpu"))
    assert torch.equal(labels, y)
    with torch.no_grad():
        torch.testing.assert_close(feats, model.proj(x))
    shuffled = DataLoader(dataset, sampler=DistributedSampler(dataset, num_replicas=2, rank=0, shuffle=True))
    with pytest.raises(ValueError, match="unshuffled"):
        extract_features(model, shuffled, torch.device("cpu"))


def probe_head(dim, classes):
    return nn.Sequential(nn.BatchNorm1d(dim, affine=False, eps=1e-6), nn.Linear(dim, classes))


def test_train_linear_head_learns_separable_features():
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    centres = torch.eye(4, 16) * 8
    train_labels, val_labels = torch.arange(4).repeat(64), torch.arange(4).repeat(16)
    train = centres[train_labels] + torch.randn(256, 16, generator=g)
    val = centres[val_labels] + torch.randn(64, 16, generator=g)
    head = probe_head(16, 4)
    seen = []
    # LARS moves a weight matrix by about lr * 0.001 of its norm per step: a large lr for a short run
    result = train_linear_head(head, train, train_labels, epochs=10, batch_size=32, lr=20.0, warmup_epochs=1,
                               val_feats=val, val_labels=val_labels,
                               on_epoch_end=lambda e, tr, va: seen.append((e, tr["lr"], va["acc1"])))
    assert [e for e, _, _ in seen] == list(range(10))
    assert seen[0][1] < seen[1][1]  # warm-up: the mean lr of epoch 0 is below epoch 1's
    assert result["acc1"] == 1.0 and result == {**result, **evaluate_head(head, val, val_labels)}
    assert result["train_loss"] < 0.5


def test_train_linear_head_resumes_and_stops_on_nan():
    feats, labels = torch.randn(20, 8), torch.randint(0, 3, (20,))
    head = probe_head(8, 3)
    seen = []
    train_linear_head(head, feats, labels, epochs=3, batch_size=8, lr=0.1, start_epoch=2,
                      on_epoch_end=lambda e, tr, va: seen.append(e))
    assert seen == [2]
    with pytest.raises(NonFiniteLossError):
        train_linear_head(head, feats * float("nan"), labels, epochs=1, batch_size=8, lr=0.1)


# ---------------------------------------------------------------------------------------------
# the named features in one pass, stratified split, lr search


def micro_classifiers():
    """A `--global_pool` and a `--cls_token` micro classifier with the same encoder weights."""
    from umae_plugin.registry import create_model

    torch.manual_seed(0)
    gp = create_model("vit_micro", num_classes=3, global_pool=True).eval()
    ct = create_model("vit_micro", num_classes=3, global_pool=False).eval()
    shared = {k: v for k, v in gp.state_dict().items() if not k.startswith("fc_norm")}
    with torch.no_grad():
        ct.norm.weight.normal_(1, 0.2), ct.norm.bias.normal_(0, 0.2)  # a norm that is not the identity
        gp.fc_norm.weight.normal_(1, 0.2), gp.fc_norm.bias.normal_(0, 0.2)
    ct.load_state_dict({**shared, "norm.weight": ct.norm.weight, "norm.bias": ct.norm.bias}, strict=True)
    return gp, ct


def test_named_features_are_defined_once_whatever_the_classifier_flag():
    import copy

    from umae_plugin.linprobe_cached import NamedFeatures

    gp, ct = micro_classifiers()
    x = torch.randn(5, 3, 32, 32)
    calls = []
    for model in (gp, ct):
        model.blocks.register_forward_hook(lambda *a: calls.append(1))
    with torch.no_grad():
        # the same encoder, final norm and fc_norm, read through either classifier: identical features
        via_gp = NamedFeatures(gp, final_norm=ct.norm, fc_norm=gp.fc_norm)(x)
        via_ct = NamedFeatures(ct, final_norm=ct.norm, fc_norm=gp.fc_norm)(x)
        assert len(calls) == 2  # one pass of the blocks for all three features
        assert set(via_gp) == set(via_ct) == {"cls", "mean", "gpool"}
        for name in via_gp:
            assert torch.equal(via_gp[name], via_ct[name]), name
        # each feature is what the classifier that reads it computes (timm's own pooling)
        assert torch.equal(via_ct["cls"], ct.forward_features(x))  # --cls_token: class token after norm
        assert torch.equal(via_gp["gpool"], gp.forward_features(x))  # --global_pool: fc_norm of un-normed mean
        ct_avg = copy.deepcopy(ct)
        ct_avg.global_pool = "avg"  # timm: mean of the final-normed patch tokens, no fc_norm
        assert torch.equal(via_ct["mean"], ct_avg.forward_features(x))
        # a fresh fc_norm (None) is a LayerNorm without affine, eps 1e-6: the reference's before training
        fresh = NamedFeatures(gp, final_norm=ct.norm, fc_norm=None)(x)["gpool"]
        tokens = ct.blocks(ct._pos_embed(ct.patch_embed(x)))
        torch.testing.assert_close(fresh, F.layer_norm(tokens[:, 1:].mean(1), (32,), eps=1e-6), rtol=0, atol=0)
        torch.testing.assert_close(fresh, nn.LayerNorm(32, eps=1e-6)(tokens[:, 1:].mean(1)))
    # no final norm (a fine-tuned --global_pool classifier): only gpool
    assert NamedFeatures(gp, final_norm=None, fc_norm=gp.fc_norm).names == ("gpool",)
    with pytest.raises(TypeError, match="class token"):
        NamedFeatures(Features(), None, None)


def test_named_features_of_a_classifier_equal_the_pretraining_models_pools():
    """A second computation: the MAE model's own `pool_latent` / `TokenTap` of its norm, and the
    classifier loaded from its weights, give the same cls / mean / gpool."""
    from umae_plugin import checkpoint as ckpt
    from umae_plugin.features import TokenTap
    from umae_plugin.linprobe_cached import NamedFeatures
    from umae_plugin.models_mae import pool_latent
    from umae_plugin.registry import create_model

    from functools import partial

    torch.manual_seed(3)  # eps 1e-6 as the real factories (the micro test model's default is torch's 1e-5)
    mae = create_model("mae_vit_micro", norm_layer=partial(nn.LayerNorm, eps=1e-6)).eval()
    with torch.no_grad():
        mae.norm.weight.normal_(1, 0.2), mae.norm.bias.normal_(0, 0.2)
    ct = create_model("vit_micro", num_classes=3, global_pool=False, img_size=32, patch_size=4).eval()
    ckpt.load_pretrained(ct, {"model": mae.state_dict()})
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        named = NamedFeatures(ct, final_norm=ct.norm, fc_norm=None)(x)
        latent = mae.forward_latent(x)
        with TokenTap(mae.norm) as tap:
            mae.forward_latent(x)
            tapped = tap.features()
    for name in ("cls", "mean"):
        torch.testing.assert_close(named[name], pool_latent(latent, name))
        assert torch.equal(tapped[name], pool_latent(latent, name)), name
    torch.testing.assert_close(named["gpool"], tapped["gpool"])


def test_extract_named_features_equals_one_feature_at_a_time():
    from umae_plugin.linprobe_cached import NamedFeatures, extract_named_features

    gp, ct = micro_classifiers()
    features = NamedFeatures(gp, final_norm=ct.norm, fc_norm=gp.fc_norm)
    x, y = torch.randn(9, 3, 32, 32), torch.arange(9)
    loader = DataLoader(TensorDataset(x, y), batch_size=4)
    feats, labels = extract_named_features(features, loader, torch.device("cpu"))
    assert list(feats) == ["cls", "mean", "gpool"] and torch.equal(labels, y)
    gpool, _ = extract_features(gp, loader, torch.device("cpu"))  # forward_features: the gpool feature
    torch.testing.assert_close(feats["gpool"], gpool, rtol=0, atol=0)
    cls, _ = extract_features(ct, loader, torch.device("cpu"))
    torch.testing.assert_close(feats["cls"], cls, rtol=0, atol=0)
    assert feats["cls"].is_contiguous() and feats["mean"].shape == (9, 32)


def test_stratified_split_holds_out_ten_percent_of_each_class():
    g = torch.Generator().manual_seed(0)
    labels = torch.cat([torch.full((n,), c) for c, n in enumerate((100, 50, 31, 7, 2, 1))])
    labels = labels[torch.randperm(len(labels), generator=g)]
    fit, held = linprobe_cached.stratified_split(labels, 0.1, seed=3)
    assert torch.equal(torch.sort(torch.cat([fit, held])).values, torch.arange(len(labels)))  # a partition
    counts = torch.bincount(labels[held], minlength=6).tolist()
    assert counts == [10, 5, 3, 1, 1, 0]  # round(0.1 n), at least 1 where a class has 2+, none of a singleton
    assert torch.equal(held, held.sort().values) and torch.equal(fit, fit.sort().values)
    again, other = linprobe_cached.stratified_split(labels, 0.1, seed=3)[1], linprobe_cached.stratified_split(labels, 0.1, seed=4)[1]
    assert torch.equal(held, again) and not torch.equal(held, other)  # fixed by the seed


def test_search_lr_picks_from_the_grid_on_held_out_training_features(monkeypatch):
    g = torch.Generator().manual_seed(0)
    centres = torch.eye(4, 16) * 3
    labels = torch.arange(4).repeat(50)
    feats = centres[labels] + torch.randn(200, 16, generator=g)
    torch.manual_seed(0)
    head = probe_head(16, 4)
    before = {k: v.clone() for k, v in head.state_dict().items()}
    seen = []
    evaluate = linprobe_cached.evaluate_head
    monkeypatch.setattr(linprobe_cached, "evaluate_head", lambda h, f, y, *a: seen.append(f) or evaluate(h, f, y, *a))
    lr, scores = linprobe_cached.search_lr(head, feats, labels, base_lr=2.0, epochs=3, batch_size=32, seed=1)
    assert set(scores) == {2.0 * f for f in linprobe_cached.LR_FACTORS} and lr in scores
    assert scores[lr] == max(scores.values())
    _, held = linprobe_cached.stratified_split(labels, 0.1, seed=1)
    assert seen and all(torch.equal(f, feats[held]) for f in seen)  # scored on the held-out 10% only
    assert all(torch.equal(v, before[k]) for k, v in head.state_dict().items())  # the template is untouched


def test_search_lr_scores_a_diverging_lr_lowest(monkeypatch):
    feats, labels = torch.randn(40, 8), torch.arange(4).repeat(10)
    head = probe_head(8, 4)
    calls = []

    def train(h, f, y, **kw):
        calls.append(kw["lr"])
        if kw["lr"] > 5:
            raise NonFiniteLossError("diverged")
        return {}  # the candidate stays as it was: every lr scores the same held-out accuracy and loss

    monkeypatch.setattr(linprobe_cached, "train_linear_head", train)
    lr, scores = linprobe_cached.search_lr(head, feats, labels, base_lr=1.0, epochs=1, batch_size=8)
    assert calls == [0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0]  # the default grid, lr x 0.1 .. 100
    assert scores[10.0] == scores[30.0] == scores[100.0] == -1.0 and len(set(scores[f] for f in (0.1, 0.3, 1.0, 3.0))) == 1
    assert lr == 1.0  # a tie in accuracy and loss: the factor nearest 1


def test_probe_features_is_seeded_and_leaves_the_global_generator_alone():
    g = torch.Generator().manual_seed(0)
    centres = torch.eye(3, 8) * 4
    train_labels, val_labels = torch.arange(3).repeat(30), torch.arange(3).repeat(10)
    train = centres[train_labels] + torch.randn(90, 8, generator=g)
    val = centres[val_labels] + torch.randn(30, 8, generator=g)
    state = torch.get_rng_state()
    kw = dict(num_classes=3, epochs=30, batch_size=16, lr=20.0, warmup_epochs=1, seed=5)
    a = linprobe_cached.probe_features(train, train_labels, val, val_labels, **kw)
    assert torch.equal(torch.get_rng_state(), state)
    b = linprobe_cached.probe_features(train, train_labels, val, val_labels, **kw)
    assert a == b and a["probe_lr"] == 20.0 and a["acc1"] > 0.9 and a["knn_acc1"] == 1.0
    searched = linprobe_cached.probe_features(train, train_labels, val, val_labels, lr_search=True, **kw)
    assert searched["probe_lr"] in {20.0 * f for f in linprobe_cached.LR_FACTORS}
