import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import main_linprobe
from umae_plugin import checkpoint as ckpt
from umae_plugin import classify, cli, data, linprobe, linprobe_cached
from umae_plugin.optim import build_lars
from umae_plugin.registry import create_model

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A `mae_vit_micro` pre-training checkpoint (32 px, patch 4) without saved args, so that
    the probe must read input and patch size off the weights."""
    path = tmp_path_factory.mktemp("pretrain") / "checkpoint-9.pth"
    torch.manual_seed(1)
    torch.save({"model": create_model("mae_vit_micro").state_dict(), "epoch": 9}, path)
    return path


def parse(*argv):
    return main_linprobe.get_args_parser().parse_args([str(a) for a in argv])


def probe_args(out, *extra, dataset="imagefolder", data_path=None, finetune=None, model="mae_vit_micro"):
    argv = ["--model", model, "--dataset", dataset, "--epochs", "1", "--warmup_epochs", "1", "--batch_size", "8",
            "--nb_classes", "3", "--device", "cpu", "--num_workers", "0", "--output_dir", out, "--log_dir", out,
            "--print_freq", "2"]
    if data_path is not None:
        argv += ["--data_path", data_path]
    if finetune is not None:
        argv += ["--finetune", finetune]
    return parse(*argv, *extra)


def log_lines(out):
    return [json.loads(line) for line in (Path(out) / "log.txt").read_text().splitlines()]


def spy_model(monkeypatch):
    """Keep the model `run_linprobe` builds, and a copy of its weights before training."""
    seen = {}
    build = linprobe.build_linprobe_model

    def spy(*a, **kw):
        model = build(*a, **kw)
        seen.update(model=model, init={k: v.clone() for k, v in model.state_dict().items()})
        return model

    monkeypatch.setattr(linprobe, "build_linprobe_model", spy)
    return seen


def test_imagefolder_epoch_trains_only_the_head_then_eval(tmp_path, folder, pretrained, monkeypatch):
    seen = spy_model(monkeypatch)
    out = tmp_path / "out"
    stats = main_linprobe.main(probe_args(out, data_path=folder, finetune=pretrained))
    model, init = seen["model"], seen["init"]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"head.1.weight", "head.1.bias"}
    assert isinstance(model.head[0], torch.nn.BatchNorm1d) and not model.head[0].affine
    final = model.state_dict()
    source = ckpt.torch_load(pretrained)["model"]
    for k, v in final.items():
        if not k.startswith("head."):
            assert torch.equal(v, init[k]), k  # the encoder is byte-identical before / after
    assert torch.equal(final["blocks.0.attn.qkv.weight"], source["blocks.0.attn.qkv.weight"])
    assert not torch.equal(final["head.1.weight"], init["head.1.weight"])
    assert init["head.1.weight"].std() == pytest.approx(0.01, rel=0.2) and not init["head.1.bias"].any()

    line = log_lines(out)[0]
    assert set(line) == {"train_lr", "train_loss", "test_acc1", "test_acc5", "test_loss", "epoch", "n_parameters"}
    assert line["n_parameters"] == 32 * 3 + 3 and line["epoch"] == 0
    assert 0 <= stats["acc1"] <= 1 and line["test_acc1"] == pytest.approx(100 * stats["acc1"])
    saved = json.loads((out / "args.json").read_text())
    assert (saved["input_size"], saved["patch_size"], saved["model"]) == (32, 4, "mae_vit_micro")
    assert saved["lr"] == pytest.approx(0.1 * 8 / 256)
    assert {p.name for p in out.glob("checkpoint-*.pth")} == {"checkpoint-0.pth", "checkpoint-last.pth"}
    assert any(p.name.startswith("events.out.tfevents") for p in out.iterdir())

    # --eval of the written checkpoint reproduces the logged accuracy and writes nothing
    before = (out / "log.txt").read_text()
    evaluated = main_linprobe.main(probe_args(tmp_path / "eval", "--eval", "--resume", out / "checkpoint-last.pth",
                                              data_path=folder, model="vit_micro"))
    assert evaluated["acc1"] == pytest.approx(stats["acc1"]) and evaluated["loss"] == pytest.approx(stats["loss"])
    assert (out / "log.txt").read_text() == before and not (tmp_path / "eval").exists()


def test_digits_cached_features_and_knn(tmp_path, pretrained):
    out = tmp_path / "out"
    stats = main_linprobe.main(probe_args(out, "--cache_features", "--epochs", "5", "--batch_size", "64", "--lr", "5",
                                          "--nb_classes", "1000", dataset="digits", finetune=pretrained))
    for key in ("acc1", "acc5", "knn_acc1", "knn_acc5", "max_acc1"):
        assert 0.0 <= stats[key] <= 1.0, key
    assert stats["knn_acc1"] > 0.3  # 10 classes: chance is 0.1; random-weight ViT features cluster digits
    assert stats["acc1"] > 0.25  # the head learns (LARS, 5 short epochs)
    lines = log_lines(out)
    assert [line["epoch"] for line in lines] == [0, 1, 2, 3, 4]
    assert lines[-1]["test_knn_acc1"] == pytest.approx(100 * stats["knn_acc1"])
    assert lines[-1]["test_acc1"] == pytest.approx(100 * stats["acc1"])
    assert json.loads((out / "args.json").read_text())["nb_classes"] == 10  # taken from the dataset
    state = ckpt.torch_load(out / "checkpoint-last.pth")
    assert state["epoch"] == 4 and state["model"]["head.1.weight"].shape == (10, 32)

    more = main_linprobe.main(probe_args(out, "--cache_features", "--epochs", "6", "--batch_size", "64", "--lr", "5",
                                         "--resume", "auto", dataset="digits", finetune=pretrained))
    assert [line["epoch"] for line in log_lines(out)] == [0, 1, 2, 3, 4, 5]
    assert more["knn_acc1"] == stats["knn_acc1"]  # same frozen encoder, same features


def test_digits_epoch_without_checkpoint(tmp_path):
    out = tmp_path / "out"
    stats = main_linprobe.main(probe_args(out, "--input_size", "32", "--batch_size", "256", dataset="digits",
                                          model="vit_micro"))
    assert 0 <= stats["acc1"] <= 1 and len(log_lines(out)) == 1
    assert json.loads((out / "args.json").read_text())["patch_size"] == 4  # the architecture's own


def test_resume_auto_is_exact(tmp_path, folder, pretrained):
    full, part = tmp_path / "full", tmp_path / "part"
    common = dict(data_path=folder, finetune=pretrained)
    main_linprobe.main(probe_args(full, "--epochs", "2", "--save_freq", "1", **common))
    part.mkdir()
    shutil.copy(full / "checkpoint-0.pth", part / "checkpoint-0.pth")  # a run killed after epoch 0
    main_linprobe.main(probe_args(part, "--epochs", "2", "--resume", "auto", **common))

    a, b = ckpt.torch_load(full / "checkpoint-last.pth"), ckpt.torch_load(part / "checkpoint-last.pth")
    assert a["epoch"] == b["epoch"] == 1
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], rtol=0, atol=0, msg=k)
    assert [line["epoch"] for line in log_lines(part)] == [0, 1]  # epoch 0's line restored from the checkpoint

    # the optimizer state after loading equals the saved one, tensor for tensor
    saved = ckpt.torch_load(part / "checkpoint-0.pth")
    args = probe_args(tmp_path / "x", data_path=folder)
    args.input_size, args.patch_size = 32, 4
    model = linprobe.build_linprobe_model("vit_micro", args, None)
    optimizer = build_lars(model.head.parameters(), lr=0.1, weight_decay=0.0)
    assert classify.load_resume_state(saved, model, optimizer) == 1
    loaded = optimizer.state_dict()
    assert loaded["state"].keys() == saved["optimizer"]["state"].keys() and loaded["state"]
    for i, s in saved["optimizer"]["state"].items():
        for name, tensor in s.items():
            assert torch.equal(loaded["state"][i][name], tensor), (i, name)


@pytest.mark.parametrize("flags, message", [
    (["--epochs", "-1"], "--epochs must be >= 0"),
    (["--blr", "0"], "--blr must be > 0"),
    (["--finetune", "/nonexistent/ckpt.pth"], "/nonexistent/ckpt.pth"),
    (["--model", "resnet50"], "--model resnet50"),
    (["--input_size", "30", "--patch_size", "4"], "not a multiple"),
])
def test_bad_flags_exit_with_message(tmp_path, flags, message, capsys):
    with pytest.raises(SystemExit) as exc:
        main_linprobe.main(probe_args(tmp_path, *flags, dataset="digits"))
    assert exc.value.code != 0
    assert message in capsys.readouterr().err


def test_missing_data_path_subprocess(tmp_path):
    proc = subprocess.run([sys.executable, "main_linprobe.py", "--data_path", "/nonexistent/imagenet", "--dataset",
                           "imagefolder", "--device", "cpu", "--output_dir", str(tmp_path), "--log_dir", ""],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "/nonexistent/imagenet" in proc.stderr


def test_parser_defaults_match_upstream():
    args = main_linprobe.get_args_parser().parse_args([])
    assert (args.batch_size, args.epochs, args.accum_iter, args.model) == (512, 90, 1, "vit_large_patch16")
    assert (args.weight_decay, args.lr, args.blr, args.min_lr, args.warmup_epochs) == (0, None, 0.1, 0, 10)
    assert (args.global_pool, args.pin_mem, args.nb_classes, args.num_workers) == (False, True, 1000, 10)
    assert (args.save_freq, args.print_freq, args.input_size, args.patch_size) == (20, 20, None, None)
    assert main_linprobe.get_args_parser().parse_args(["--global_pool", "--no_pin_mem"]).global_pool is True
    assert main_linprobe.get_args_parser().parse_args(["--cls_token"]).global_pool is False


def test_checkpoint_geometry_comes_from_the_weights():
    """The probe's input and patch size (`classify.prologue`) are the checkpoint's model's
    (`checkpoint.checkpoint_model_args`). Saved args that disagree with the weights do not win: the
    position embedding holds 8 x 8 + 1 tokens and the kernel is 4 px, so this encoder was trained on
    32-px images whatever `input_size` says; a 64-px grid would need 16 x 16 positions."""
    import argparse

    state = create_model("mae_vit_micro").state_dict()  # 32 px, patch 4: 8 x 8 grid + class token

    def geometry(source):
        kwargs = ckpt.checkpoint_model_args(source)["kwargs"]
        return kwargs["img_size"], kwargs["patch_size"]

    assert geometry({"model": state}) == (32, 4)
    assert geometry({"model": state, "args": argparse.Namespace(input_size=64)}) == (32, 4)
    assert geometry({"model": state, "args": {"input_size": 48, "patch_size": 8}}) == (32, 4)
    with pytest.raises(ckpt.CheckpointMismatchError):
        geometry({"args": argparse.Namespace(input_size=None)})  # no weights: nothing to read


def test_model_names():
    assert classify.classifier_name("mae_vit_base_patch16") == "vit_base_patch16"
    assert classify.classifier_name("umae_vit_large_patch16") == "vit_large_patch16"
    assert classify.classifier_name("vit_huge_patch14") == "vit_huge_patch14"
    with pytest.raises(classify.ConfigError, match="mae_resnet50"):
        classify.classifier_name("mae_resnet50")
    # The README's SimMIM names and the reference's MAE aliases, through registry.parse_model_name.
    assert classify.classifier_name("simmim_vit_base_patch16") == "vit_base_patch16"
    assert classify.classifier_name("usimmim_vit_base_patch16") == "vit_base_patch16"
    assert classify.classifier_name("mae_vit_base_patch16_dec512d8b") == "vit_base_patch16"
    with pytest.raises(classify.ConfigError, match="--model simmim_resnet50: no classifier named"):
        classify.classifier_name("simmim_resnet50")


def test_encoder_overrides_come_from_the_checkpoint_args(tmp_path, folder):
    """`main_pretrain.py --embed_dim 32 --depth 1 --num_heads 2` checkpoints probe with the same --model."""
    import argparse

    torch.manual_seed(0)
    small = dict(embed_dim=32, depth=1, num_heads=2)
    pre = create_model("mae_vit_tiny_patch16", img_size=32, patch_size=4, decoder_embed_dim=16, decoder_depth=1,
                       decoder_num_heads=2, **small)
    path = tmp_path / "pre.pth"
    torch.save({"model": pre.state_dict(), "epoch": 0,
                "args": argparse.Namespace(input_size=32, patch_size=4, decoder_depth=1, **small)}, path)
    out = tmp_path / "out"
    main_linprobe.main(probe_args(out, data_path=folder, finetune=path, model="mae_vit_tiny_patch16"))
    saved = json.loads((out / "args.json").read_text())
    assert {k: saved[k] for k in small} == small
    assert ckpt.torch_load(out / "checkpoint-last.pth")["model"]["cls_token"].shape == (1, 1, 32)


def test_image_folder_with_more_classes_than_nb_classes(tmp_path, folder):
    with pytest.raises(classify.ConfigError, match="3 classes but --nb_classes is 2"):
        main_linprobe.main(probe_args(tmp_path, "--nb_classes", "2", "--input_size", "32", data_path=folder,
                                      model="vit_micro"))


# ---------------------------------------------------------------------------------------------
# --cache_features: both pools; --lr_search; --baselines

FEATURES = ("cls", "mean", "gpool")
FEATURE_KEYS = [f"{kind}_{m}_{f}" for kind in ("test", "knn") for m in ("acc1", "acc5") for f in FEATURES]


def cached_args(out, *extra, pool="--cls_token", epochs=3, finetune=None):
    return probe_args(out, "--cache_features", "--epochs", epochs, "--batch_size", "64", "--lr", "5", pool, *extra,
                      dataset="digits", finetune=finetune)


def digits_named_features(model, final_norm, fc_norm):
    features = linprobe_cached.NamedFeatures(model, final_norm, fc_norm)
    loaders = [data.build_loader(data.build_dataset("digits", None, split, data.eval_transform(32)), 256, train=False,
                                 num_workers=0, pin_memory=False) for split in ("train", "val")]
    return [linprobe_cached.extract_named_features(features, loader, torch.device("cpu")) for loader in loaders]


def test_cached_probe_reports_every_feature_the_same_whatever_the_flag(tmp_path, pretrained):
    """The same checkpoint probed with --cls_token and with --global_pool: identical numbers for
    every named feature; the flag only picks the headline (cls / gpool) and the checkpoint's model."""
    runs = {}
    for flag in ("--cls_token", "--global_pool"):
        out = tmp_path / flag.strip("-")
        runs[flag] = (out, main_linprobe.main(cached_args(out, "--lr_search", "--lr_factors", "1,3", pool=flag,
                                                          epochs=2, finetune=pretrained)))
    (_, ct), (_, gp) = runs["--cls_token"], runs["--global_pool"]
    assert ct["features"] == gp["features"] == list(FEATURES) and ct["features_unavailable"] == []
    for key in [*FEATURE_KEYS, *(f"probe_lr_{f}" for f in FEATURES)]:
        assert 0.0 <= ct[key] <= (1.0 if "acc" in key else 15.0), key
        assert ct[key] == gp[key], key  # bitwise: one definition of each feature, one protocol
    for stats, name in ((ct, "cls"), (gp, "gpool")):
        assert stats["feature"] == name
        assert (stats["acc1"], stats["acc5"]) == (stats[f"test_acc1_{name}"], stats[f"test_acc5_{name}"])
        assert (stats["knn_acc1"], stats["probe_lr"]) == (stats[f"knn_acc1_{name}"], stats[f"probe_lr_{name}"])
    for flag, name in (("--cls_token", "cls"), ("--global_pool", "gpool")):
        out = runs[flag][0]
        lines = log_lines(out)
        assert [line["epoch"] for line in lines] == [0, 1] and lines[-1]["feature"] == name
        for key in FEATURE_KEYS:
            assert lines[-1][key] == pytest.approx(100 * runs[flag][1][key]), key  # percent in log.txt
        assert lines[-1]["test_acc1"] == lines[-1][f"test_acc1_{name}"]
        assert lines[-1]["test_knn_acc1"] == lines[-1][f"knn_acc1_{name}"]


@pytest.mark.parametrize("pool, name", [("--cls_token", "cls"), ("--global_pool", "gpool")])
def test_cached_probe_checkpoint_recomputes_every_feature(tmp_path, pretrained, pool, name):
    """A second computation from the checkpoint: `model` is the flag's classifier (strict) with the
    headline head, `feature_heads` the others, `feature_norms` the norms the features used."""
    import copy

    out = tmp_path / "out"
    stats = main_linprobe.main(cached_args(out, pool=pool, finetune=pretrained))
    assert stats["probe_lr"] == stats["probe_lr_cls"] == stats["probe_lr_gpool"] == 5.0  # no search: --lr
    state = ckpt.torch_load(out / "checkpoint-last.pth")
    args = probe_args(tmp_path / "x", pool, dataset="digits")
    args.input_size, args.patch_size, args.nb_classes = 32, 4, 10
    model = linprobe.build_linprobe_model("vit_micro", args, None)
    model.load_state_dict(state["model"], strict=True)
    model.eval()
    others = [f for f in FEATURES if f != name]
    assert sorted(state["feature_heads"]) == sorted(others)
    assert all(state["feature_heads"][f]["epoch"] == state["epoch"] == 2 for f in others)
    heads = {name: model.head}
    for f in others:
        heads[f] = copy.deepcopy(model.head)
        heads[f].load_state_dict(state["feature_heads"][f]["head"])
    norms = []
    for key in ("final_norm", "fc_norm"):
        norms.append(torch.nn.LayerNorm(32, eps=1e-6))
        norms[-1].load_state_dict(state["feature_norms"][key])
    # the final norm is the pre-trained one (from the file), fc_norm the reference's fresh one
    source = ckpt.torch_load(pretrained)["model"]
    assert torch.equal(norms[0].weight, source["norm.weight"]) and torch.equal(norms[1].weight, torch.ones(32))
    (train, train_labels), (val, val_labels) = digits_named_features(model, *norms)
    for f in FEATURES:
        acc = linprobe_cached.evaluate_head(heads[f], val[f], val_labels)["acc1"]
        assert acc == pytest.approx(stats[f"test_acc1_{f}"]), f
        knn = linprobe_cached.knn_accuracy(train[f], train_labels, val[f], val_labels, num_classes=10)
        assert knn["acc1"] == pytest.approx(stats[f"knn_acc1_{f}"]), f
    with torch.no_grad():  # the headline feature is the classifier's own forward_features
        images = torch.stack([data.build_dataset("digits", None, "val", data.eval_transform(32))[i][0] for i in range(8)])
        torch.testing.assert_close(model.forward_features(images), val[name][:8])


def test_cached_probe_of_a_source_without_final_norm_reports_only_gpool(tmp_path, pretrained, capsys):
    """A fine-tuned --global_pool classifier dropped the final norm: cls / mean are unavailable
    (said so), --global_pool probes gpool, --cls_token is refused in one line."""
    source = tmp_path / "finetuned.pth"
    torch.manual_seed(0)
    clf = create_model("vit_micro", num_classes=10, global_pool=True, img_size=32)
    ckpt.load_pretrained(clf, pretrained)
    torch.save({"model": clf.state_dict()}, source)
    stats = main_linprobe.main(cached_args(tmp_path / "gp", pool="--global_pool", epochs=1, finetune=source))
    assert stats["features"] == ["gpool"] and stats["features_unavailable"] == ["cls", "mean"]
    assert "test_acc1_cls" not in stats and stats["acc1"] == stats["test_acc1_gpool"]
    with pytest.raises(SystemExit) as exc:
        cli.run_main(main_linprobe.get_args_parser, main_linprobe.main,
                     argv=[str(a) for a in ["--model", "mae_vit_micro", "--dataset", "digits", "--cache_features",
                                            "--cls_token", "--finetune", source, "--epochs", "1", "--device", "cpu",
                                            "--num_workers", "0", "--output_dir", tmp_path / "ct", "--log_dir",
                                            tmp_path / "ct"]])
    assert exc.value.code != 0 and "no final norm" in capsys.readouterr().err


def test_lr_search_uses_only_the_training_set(tmp_path, pretrained, monkeypatch):
    searched, scored, inside = [], [], [False]
    search, evaluate = linprobe.search_lr, linprobe_cached.evaluate_head

    def spy_search(head, feats, labels, **kw):
        searched.append((len(feats), labels.clone(), kw["base_lr"]))
        inside[0] = True
        try:
            return search(head, feats, labels, **kw)
        finally:
            inside[0] = False

    def spy_evaluate(head, feats, labels, *a):
        if inside[0]:
            scored.append(labels.clone())
        return evaluate(head, feats, labels, *a)

    monkeypatch.setattr(linprobe, "search_lr", spy_search)
    monkeypatch.setattr(linprobe_cached, "evaluate_head", spy_evaluate)
    out = tmp_path / "out"
    stats = main_linprobe.main(cached_args(out, "--lr_search", epochs=2, finetune=pretrained))

    train_labels = torch.tensor(data.build_dataset("digits", None, "train", None).targets)
    assert len(searched) == 3  # one search per feature, on all training features, from --lr
    for n, labels, base_lr in searched:
        assert n == len(train_labels) == 1437 and torch.equal(labels, train_labels) and base_lr == 5.0
    _, held = linprobe_cached.stratified_split(train_labels, 0.1, seed=0)
    assert len(scored) == 3 * len(linprobe_cached.LR_FACTORS)  # every candidate scored on the held-out part
    assert all(torch.equal(labels, train_labels[held]) for labels in scored)
    grid = {5.0 * f for f in linprobe_cached.LR_FACTORS}
    assert {stats["probe_lr"], *(stats[f"probe_lr_{f}"] for f in FEATURES)} <= grid
    assert stats["probe_lr"] == stats["probe_lr_cls"]  # --cls_token
    line = log_lines(out)[-1]
    assert [line[f"probe_lr_{f}"] for f in FEATURES] == [stats[f"probe_lr_{f}"] for f in FEATURES]
    assert ckpt.torch_load(out / "checkpoint-last.pth")["lr_search"] == {f: stats[f"probe_lr_{f}"] for f in FEATURES}


def test_cached_resume_continues_every_head_with_the_searched_lr(tmp_path, pretrained, monkeypatch):
    full, part = tmp_path / "full", tmp_path / "part"
    main_linprobe.main(cached_args(full, "--lr_search", "--save_freq", "1", epochs=2, finetune=pretrained))
    part.mkdir()
    shutil.copy(full / "checkpoint-0.pth", part / "checkpoint-0.pth")  # a run killed after epoch 0

    def no_search(*a, **kw):
        raise AssertionError("a resumed run searches the lr again")

    monkeypatch.setattr(linprobe, "search_lr", no_search)
    resumed = main_linprobe.main(cached_args(part, "--lr_search", "--resume", "auto", epochs=2, finetune=pretrained))
    a, b = ckpt.torch_load(full / "checkpoint-last.pth"), ckpt.torch_load(part / "checkpoint-last.pth")
    assert a["lr_search"] == b["lr_search"] and set(b["feature_heads"]) == {"mean", "gpool"}
    assert all(b["feature_heads"][f]["epoch"] == 1 for f in b["feature_heads"])
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], rtol=0, atol=0, msg=k)
    for f in a["feature_heads"]:
        for k in a["feature_heads"][f]["head"]:
            torch.testing.assert_close(a["feature_heads"][f]["head"][k], b["feature_heads"][f]["head"][k],
                                       rtol=0, atol=0, msg=k)
    assert log_lines(part)[-1] == log_lines(full)[-1]
    assert resumed["test_acc1_mean"] * 100 == pytest.approx(log_lines(full)[-1]["test_acc1_mean"])


@pytest.mark.parametrize("flag", ["--lr_search", "--baselines"])
def test_lr_search_and_baselines_need_cache_features(tmp_path, flag, capsys):
    with pytest.raises(SystemExit) as exc:
        main_linprobe.main(probe_args(tmp_path / "a", flag, dataset="digits"))
    assert exc.value.code == 2 and f"{flag} needs --cache_features" in capsys.readouterr().err
    with pytest.raises(classify.ConfigError, match=f"{flag} needs --cache_features"):
        linprobe.run_linprobe(probe_args(tmp_path / "b", flag, dataset="digits"))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_baselines_are_returned_and_logged(tmp_path, pretrained):
    out = tmp_path / "out"
    stats = main_linprobe.main(cached_args(out, "--baselines", epochs=2, finetune=pretrained))
    keys = ["raw_pixels_logreg_acc1", "raw_pixels_knn_acc1", "random_init_acc1", "random_init_knn_acc1",
            "raw_pixels_logreg_acc5", "raw_pixels_knn_acc5", "random_init_acc5", "random_init_knn_acc5"]
    for key in keys:
        assert 0.0 <= stats[key] <= 1.0, key
        for line in log_lines(out):
            assert line[key] == pytest.approx(100 * stats[key]), key
    assert stats["raw_pixels_logreg_acc1"] > 0.9 and stats["raw_pixels_knn_acc1"] > 0.9
    assert stats["random_init_probe_lr"] == 5.0


def test_new_flags_are_grouped_and_off_by_default():
    parser = main_linprobe.get_args_parser()
    group_of = {a.dest: g.title for g in parser._action_groups for a in g._group_actions}
    assert group_of["lr_search"] == cli.OPTIM and group_of["baselines"] == cli.RUN
    args = parser.parse_args([])
    assert args.lr_search is False and args.baselines is False and args.cache_features is False
    assert parser.parse_args(["--blr", "0.3"]).blr == 0.3  # upstream's --blr keeps its meaning


def test_finetune_takes_an_exported_folder(tmp_path, folder, monkeypatch):
    """`--finetune` reads a folder as the loaders do (here timm's local-dir layout written by
    `umae_plugin.export`): the probe's encoder starts from exactly the exported weights."""
    from umae_plugin.export import export_checkpoint

    torch.manual_seed(0)
    small = dict(img_size=32, patch_size=4, embed_dim=32, depth=1, num_heads=2)
    pre = create_model("mae_vit_tiny_patch16", decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2, **small)
    path = tmp_path / "pre.pth"
    from umae_plugin.registry import resolved_kwargs

    record = ckpt.model_args("mae_vit_tiny_patch16", resolved_kwargs(pre))
    torch.save({"model": pre.state_dict(), "epoch": 0, ckpt.MODEL_ARGS_KEY: record}, path)
    exported = export_checkpoint(path, tmp_path / "timm", "timm")
    seen = spy_model(monkeypatch)
    main_linprobe.main(probe_args(tmp_path / "out", data_path=folder, finetune=exported, model="mae_vit_tiny_patch16"))
    encoder = {k: v for k, v in pre.state_dict().items() if not k.startswith(("decoder", "mask_token"))}
    assert all(torch.equal(seen["init"][k], v) for k, v in encoder.items())
