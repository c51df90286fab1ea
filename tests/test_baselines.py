import time

import pytest
import torch
import torch.nn.functional as F

from umae_plugin import baselines, data
from umae_plugin.linprobe_cached import knn_accuracy
from umae_plugin.registry import create_model


@pytest.fixture(scope="module")
def digits():
    tf = data.eval_transform(32)
    return data.build_dataset("digits", None, "train", tf), data.build_dataset("digits", None, "val", tf)


def test_raw_pixels_on_digits(digits):
    train_set, val_set = digits
    start = time.time()
    stats = baselines.raw_pixel_baselines(train_set, val_set, num_classes=10)
    elapsed = time.time() - start
    assert set(stats) == {"raw_pixels_logreg_acc1", "raw_pixels_logreg_acc5", "raw_pixels_knn_acc1",
                          "raw_pixels_knn_acc5"}
    assert stats["raw_pixels_logreg_acc1"] > 0.9  # digits' fixed split: linear on pixels is strong
    assert stats["raw_pixels_knn_acc1"] > 0.9
    assert stats["raw_pixels_logreg_acc1"] <= stats["raw_pixels_logreg_acc5"] <= 1.0
    assert elapsed < 60  # a few seconds on 2 cores; loose for loaded machines

    # the k-NN is the cached probe's (k 20, T 0.07) on the flattened eval-transformed pixels
    x, y = baselines.image_arrays(train_set)
    xv, yv = baselines.image_arrays(val_set)
    assert x.shape == (1437, 3 * 32 * 32) and torch.equal(yv, torch.tensor(val_set.targets))
    torch.testing.assert_close(x[0], train_set[0][0].flatten())
    knn = knn_accuracy(F.normalize(x, dim=1), y, F.normalize(xv, dim=1), yv, k=20, temperature=0.07, num_classes=10)
    assert stats["raw_pixels_knn_acc1"] == knn["acc1"]


def test_logistic_regression_on_separable_data_and_top5_over_its_classes():
    g = torch.Generator().manual_seed(0)
    centres = torch.eye(7, 12) * 6
    train_y, val_y = torch.arange(7).repeat(20), torch.arange(7).repeat(5)
    train_x = centres[train_y] + torch.randn(140, 12, generator=g)
    val_x = centres[val_y] + torch.randn(35, 12, generator=g)
    assert baselines.logistic_regression_accuracy(train_x, train_y, val_x, val_y) == {"acc1": 1.0, "acc5": 1.0}
    # labels that are not 0..C-1: ranked by the classifier's own classes
    shifted = baselines.logistic_regression_accuracy(train_x, train_y + 3, val_x, val_y + 3, max_iter=50)
    assert shifted["acc1"] == 1.0


def test_random_init_is_seeded_finite_and_leaves_the_global_generator_alone(digits):
    train_set, val_set = digits
    subset_train = torch.utils.data.Subset(train_set, range(300))
    subset_val = torch.utils.data.Subset(val_set, range(100))
    built = []

    def build():
        model = create_model("vit_micro", num_classes=10, global_pool=True)
        built.append(model.patch_embed.proj.weight.detach().clone())
        return model

    kw = dict(num_classes=10, epochs=2, batch_size=64, lr=5.0, warmup_epochs=1, seed=3)
    state = torch.get_rng_state()
    a = baselines.random_init_baseline(build, subset_train, subset_val, **kw)
    assert torch.equal(torch.get_rng_state(), state)
    b = baselines.random_init_baseline(build, subset_train, subset_val, **kw)
    c = baselines.random_init_baseline(build, subset_train, subset_val, **{**kw, "seed": 4})
    assert torch.equal(built[0], built[1]) and not torch.equal(built[0], built[2])  # the seed initialises
    assert a == b
    assert set(a) == {"random_init_acc1", "random_init_acc5", "random_init_knn_acc1", "random_init_knn_acc5",
                      "random_init_probe_lr"}
    for key, value in {**a, **c}.items():
        if "acc" in key:
            assert 0.0 <= value <= 1.0, key
    assert a["random_init_probe_lr"] == 5.0
    searched = baselines.random_init_baseline(build, subset_train, subset_val, lr_search=True, **kw)
    assert searched["random_init_probe_lr"] in {5.0 * f for f in (0.1, 0.3, 1.0, 3.0, 10.0)}
