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
