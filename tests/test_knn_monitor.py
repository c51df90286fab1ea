"""The pre-training k-NN monitor (`--knn_freq`): the bank it draws, its accuracy against a
brute-force second computation, the same result on two gloo ranks, and the epochs it logs on."""
import json
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils.data import DataLoader, TensorDataset

import main_pretrain
from umae_plugin import data
from umae_plugin.engine_pretrain import KNN_K, KNN_TEMPERATURE, evaluate_knn, knn_bank_indices
from umae_plugin.models_mae import MaskedAutoencoderViT
from umae_plugin.models_simmim import SimMIMViT

KW = dict(img_size=16, patch_size=4, embed_dim=32, depth=1, num_heads=2)


def images(n, seed, classes=3):
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 3, 16, 16, generator=g), torch.randint(0, classes, (n,), generator=g))


def brute_force_knn(bank_x, bank_y, val_x, val_y, k, temperature, classes):
    """Top-1 of weighted k-NN, one val image at a time: sort all cosine similarities, add the k
    largest's exp(s / T) to their classes, take the class with the highest score."""
    bank = bank_x / bank_x.norm(dim=1, keepdim=True)
    right = 0
    for x, y in zip(val_x, val_y):
        sims = bank @ (x / x.norm())
        order = sorted(range(len(sims)), key=lambda i: -float(sims[i]))[:k]
        scores = [0.0] * classes
        for i in order:
            scores[int(bank_y[i])] += float(torch.exp(sims[i] / temperature))
        right += int(max(range(classes), key=lambda c: scores[c]) == int(y))
    return right / len(val_y)


def test_bank_is_the_first_n_of_a_seed_zero_permutation():
    assert knn_bank_indices(50, 10) == torch.randperm(50, generator=torch.Generator().manual_seed(0))[:10].tolist()
    assert knn_bank_indices(50, 10) == knn_bank_indices(50, 10)
    assert sorted(knn_bank_indices(7, 10_000)) == list(range(7))  # all of them when the set is smaller


@pytest.mark.parametrize("family, pool", [("mae", "mean"), ("mae", "cls"), ("simmim", "mean")])
def test_knn_equals_brute_force_on_the_models_features(family, pool):
    torch.manual_seed(0)
    model = MaskedAutoencoderViT(**KW, decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2) \
        if family == "mae" else SimMIMViT(**KW)
    bank, val = images(40, 1), images(24, 2)
    model.train()
    got = evaluate_knn(model, DataLoader(bank, batch_size=16), DataLoader(val, batch_size=16), torch.device("cpu"),
                       pool=pool, num_classes=3)
    assert model.training  # left as it was
    model.eval()
    with torch.no_grad():
        bank_x, val_x = (model.forward_features(s.tensors[0], pool) for s in (bank, val))
    expected = brute_force_knn(bank_x, bank.tensors[1], val_x, val.tensors[1], KNN_K, KNN_TEMPERATURE, 3)
    assert got["knn_acc1"] == pytest.approx(expected, abs=1e-12) and got["knn_time_s"] > 0


def _worker(rank, world, port, out):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        model = MaskedAutoencoderViT(**KW, decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2)
        loaders = [data.build_loader(s, 8, train=False, num_workers=0, pin_memory=False) for s in (images(21, 1), images(13, 2))]
        result = evaluate_knn(model, *loaders, torch.device("cpu"), pool="mean", num_classes=3)
        torch.save(result["knn_acc1"], f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # two spawned processes
def test_two_ranks_share_the_extraction_and_agree_with_one_process(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "acc"
    mp.spawn(_worker, args=(2, port, str(out)), nprocs=2, join=True)
    torch.manual_seed(0)
    model = MaskedAutoencoderViT(**KW, decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2)
    single = evaluate_knn(model, DataLoader(images(21, 1), batch_size=8), DataLoader(images(13, 2), batch_size=8),
                          torch.device("cpu"), pool="mean", num_classes=3)["knn_acc1"]
    # odd set sizes: the DistributedSampler pads the shards, the gather cuts the padding off
    assert [torch.load(f"{out}.{r}") for r in range(2)] == [single, single]


@pytest.mark.slow  # three epochs of pre-training
def test_pretrain_logs_knn_every_n_epochs_and_at_the_end(tmp_path):
    args = main_pretrain.get_args_parser().parse_args([
        "--model", "mae_vit_micro", "--dataset", "digits", "--input_size", "32", "--epochs", "3", "--warmup_epochs", "1",
        "--batch_size", "128", "--device", "cpu", "--num_workers", "0", "--erank_freq", "0", "--knn_freq", "2",
        "--knn_bank", "500", "--output_dir", str(tmp_path), "--log_dir", str(tmp_path), "--print_freq", "100"])
    main_pretrain.main(args)
    lines = [json.loads(line) for line in (tmp_path / "log.txt").read_text().splitlines()]
    # after 2 epochs of training (epoch index 1) and after the last (index 2); the initial weights on line 0
    assert ["knn_acc1" in line for line in lines] == [False, True, True]
    assert set(k for k in lines[0] if k.startswith("knn")) == {"knn_acc1_init", "knn_acc1_init_cls",
                                                               "knn_acc1_init_mean", "knn_acc1_init_gpool"}
    for line in (lines[1], lines[2]):
        assert 0.0 <= line["knn_acc1"] <= 1.0 and line["knn_time_s"] > 0
        assert line["knn_acc1"] == line["knn_acc1_mean"]  # the headline: --feature_pool (default --unif_pool mean)
        for f in ("cls", "mean", "gpool"):
            assert line[f"knn_acc1_{f}"] > 0.2, f  # ten digit classes: far above chance even from an encoder this small
