"""Baselines for linear-probe tables: what a probe reaches without pre-training.

- Raw pixels (`raw_pixel_baselines`): the flattened eval-transformed images of a dataset,
  classified by a logistic regression (scikit-learn's `LogisticRegression`, lbfgs, inputs
  standardised with the training set's per-pixel mean and std, `max_iter` fixed at
  `LOGREG_MAX_ITER`, stopped there whether converged or not) and by the weighted k-NN of the
  cached probe (`linprobe_cached.knn_accuracy`, k = 20, T = 0.07, cosine similarity of the
  L2-normalised pixel vectors).
- Random initialisation (`random_init_baseline`): the same architecture freshly initialised from
  a seed, its features (`forward_features`, the model's own pooling) probed with the cached-feature
  protocol of `main_linprobe.py --cache_features` (`linprobe_cached.probe_features`).

Both take datasets whose transform is the evaluation one (`data.eval_transform`), meant for
small sets (digits, CIFAR-10): raw pixels hold every image in memory. Accuracies are fractions
in [0, 1]; keys are named as `main_linprobe.py --baselines` logs them. Used by
`main_linprobe.py --baselines`, the quick start and the recipes.
"""
from __future__ import annotations

import contextlib
import warnings
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset

from . import data
from .linprobe_cached import Autocast, extract_features, knn_accuracy, probe_features

LOGREG_MAX_ITER = 200


def image_arrays(dataset: Dataset, *, batch_size: int = 256, num_workers: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Every image of `dataset` (as its transform gives it) flattened: ([N, C*H*W] float32,
    [N] int64) on the CPU, in dataset order. Reads the whole dataset in this process."""
    xs, ys = [], []
    for images, targets in DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers):
        xs.append(images.flatten(1).float())
        ys.append(torch.as_tensor(targets).long())
    return torch.cat(xs), torch.cat(ys)


def logistic_regression_accuracy(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    val_x: torch.Tensor,
    val_y: torch.Tensor,
    *,
    max_iter: int = LOGREG_MAX_ITER,
    seed: int = 0,
) -> dict[str, float]:
    """Top-1 / top-5 accuracy of a multinomial logistic regression (lbfgs, C = 1) on inputs
    standardised with the training set's per-feature mean and std, trained for at most `max_iter`
    iterations (a convergence warning at that limit is expected and silenced)."""
    try:
        from sklearn.exceptions import ConvergenceWarning
        from sklearn.linear_model import LogisticRegression
        from sklearn.preprocessing import StandardScaler
    except ImportError as err:
        raise ImportError("the raw-pixel baseline needs scikit-learn: pip install scikit-learn") from err
    scaler = StandardScaler().fit(train_x.numpy())
    classifier = LogisticRegression(max_iter=max_iter, random_state=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        classifier.fit(scaler.transform(train_x.numpy()), train_y.numpy())
    proba = classifier.predict_proba(scaler.transform(val_x.numpy()))
    ranked = classifier.classes_[np.argsort(-proba, axis=1)]  # classes, most probable first
    target = val_y.numpy()[:, None]
    return {"acc1": float((ranked[:, :1] == target).any(axis=1).mean()),
            "acc5": float((ranked[:, :5] == target).any(axis=1).mean())}


def raw_pixel_baselines(
    train_set: Dataset,
    val_set: Dataset,
    *,
    num_classes: int | None = None,
    k: int = 20,
    temperature: float = 0.07,
    max_iter: int = LOGREG_MAX_ITER,
    seed: int = 0,
    batch_size: int = 256,
    num_workers: int = 0,
) -> dict[str, float]:
    """Raw-pixel baselines on the eval-transformed images of `train_set` / `val_set`:
    `raw_pixels_logreg_acc{1,5}` (`logistic_regression_accuracy`) and `raw_pixels_knn_acc{1,5}`
    (weighted k-NN, `k`, `temperature`, on L2-normalised flattened pixels)."""
    train_x, train_y = image_arrays(train_set, batch_size=batch_size, num_workers=num_workers)
    val_x, val_y = image_arrays(val_set, batch_size=batch_size, num_workers=num_workers)
    logreg = logistic_regression_accuracy(train_x, train_y, val_x, val_y, max_iter=max_iter, seed=seed)
    knn = knn_accuracy(train_x, train_y, val_x, val_y, k=k, temperature=temperature, num_classes=num_classes)
    return {"raw_pixels_logreg_acc1": logreg["acc1"], "raw_pixels_logreg_acc5": logreg["acc5"],
            "raw_pixels_knn_acc1": knn["acc1"], "raw_pixels_knn_acc5": knn["acc5"]}


def random_init_baseline(
    build_model: Callable[[], nn.Module],
    train_set: Dataset,
    val_set: Dataset,
    *,
    num_classes: int,
    epochs: int,
    batch_size: int,
    lr: float,
    min_lr: float = 0.0,
    warmup_epochs: float = 0.0,
    weight_decay: float = 0.0,
    seed: int = 0,
    lr_search: bool = False,
    device: torch.device | str = "cpu",
    autocast: Autocast = contextlib.nullcontext,
    loader_batch_size: int = 256,
    num_workers: int = 0,
    pin_memory: bool = False,
    print_freq: int = 20,
    k: int = 20,
    temperature: float = 0.07,
) -> dict[str, float]:
    """The architecture `build_model()` returns, initialised with the global generator seeded
    by `seed` (the caller's random state is left as it was), probed on its frozen
    `forward_features` of `train_set` / `val_set` with `linprobe_cached.probe_features` (same
    head, LARS, schedule `epochs` / `batch_size` / `lr` / ..., lr search when `lr_search`, k-NN).
    Returns `random_init_acc{1,5}`, `random_init_knn_acc{1,5}` and `random_init_probe_lr`.
    Under several processes every process must call it (features are gathered)."""
    device = torch.device(device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_model()
    model.to(device).eval()
    feats = [extract_features(model, data.build_loader(s, loader_batch_size, train=False, num_workers=num_workers,
                                                       pin_memory=pin_memory), device, autocast, print_freq=print_freq)
             for s in (train_set, val_set)]
    (train_feats, train_labels), (val_feats, val_labels) = feats
    stats = probe_features(train_feats, train_labels, val_feats, val_labels, num_classes=num_classes, epochs=epochs,
                           batch_size=batch_size, lr=lr, min_lr=min_lr, warmup_epochs=warmup_epochs,
                           weight_decay=weight_decay, seed=seed, lr_search=lr_search, k=k, temperature=temperature)
    return {"random_init_acc1": stats["acc1"], "random_init_acc5": stats["acc5"],
            "random_init_knn_acc1": stats["knn_acc1"], "random_init_knn_acc5": stats["knn_acc5"],
            "random_init_probe_lr": stats["probe_lr"]}
