import json
from pathlib import Path

import pytest
import torch

import main_finetune
from umae_plugin import checkpoint as ckpt
from umae_plugin import classify, finetune
from umae_plugin.registry import create_model


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A `mae_vit_micro` pre-training checkpoint (32 px, patch 4) saved with upstream-style args."""
    import argparse

    path = tmp_path_factory.mktemp("pretrain") / "checkpoint-9.pth"
    torch.manual_seed(1)
    args = argparse.Namespace(model="mae_vit_micro", input_size=32, patch_size=4)
    torch.save({"model": create_model("mae_vit_micro").state_dict(), "args": args, "epoch": 9}, path)
    return path


def parse(*argv):
    return main_finetune.get_args_parser().parse_args([str(a) for a in argv])


def ft_args(out, *extra, dataset="imagefolder", data_path=None, finetune=None, model="mae_vit_micro"):
    argv = ["--model", model, "--dataset", dataset, "--input_size", "32", "--epochs", "1", "--warmup_epochs", "1",
            "--batch_size", "8", "--nb_classes", "3", "--device", "cpu", "--num_workers", "0",
            "--output_dir", out, "--log_dir", out, "--print_freq", "2"]
    if data_path is not None:
        argv += ["--data_path", data_path]
    if finetune is not None:
        argv += ["--finetune", finetune]
    return parse(*argv, *extra)


def log_lines(out):
    return [json.loads(line) for line in (Path(out) / "log.txt").read_text().splitlines()]


def expected_scale(name, depth, decay):
    """The reference's layer-wise rule, written out: embeddings 0, block i -> i + 1, rest -> depth + 1."""
    layers = depth + 1
    if name in ("cls_token", "pos_embed") or name.startswith("patch_embed."):
        layer = 0
    elif name.startswith("blocks."):
        layer = int(name.split(".")[1]) + 1
    else:
        layer = layers
    return decay ** (layers - layer)


def test_imagefolder_epoch_with_mixup_layer_decay_groups(tmp_path, folder, pretrained, monkeypatch):
    seen = {}
    build, train = finetune.build_finetune_model, classify.train_one_epoch

    def spy_build(*a, **kw):
        seen["model"] = build(*a, **kw)
        seen["init_head"] = seen["model"].head.weight.detach().clone()
        return seen["model"]

    def spy_train(model, criterion, loader, optimizer, **kw):
        seen.update(criterion=criterion, optimizer=optimizer, kw=kw)
        return train(model, criterion, loader, optimizer, **kw)

    monkeypatch.setattr(finetune, "build_finetune_model", spy_build)
    monkeypatch.setattr(classify, "train_one_epoch", spy_train)
    out = tmp_path / "out"
    stats = main_finetune.main(ft_args(out, "--mixup", "0.8", "--cutmix", "1.0", "--clip_grad", "1.0",
                                       "--layer_decay", "0.5", data_path=folder, finetune=pretrained))
    model, optimizer = seen["model"], seen["optimizer"]
    assert type(seen["criterion"]).__name__ == "SoftTargetCrossEntropy"
    assert seen["kw"]["mixup_fn"] is not None and seen["kw"]["clip_grad"] == 1.0
    assert seen["init_head"].abs().max() < 1e-4  # fresh head: trunc-normal(std 2e-5)

    names = {id(p): n for n, p in model.named_parameters()}
    covered = set()
    for group in optimizer.param_groups:
        for p in group["params"]:
            name = names[id(p)]
            covered.add(name)
            assert group["lr_scale"] == pytest.approx(expected_scale(name, 1, 0.5)), name
            no_wd = p.ndim == 1 or name in ("cls_token", "pos_embed")
            assert group["weight_decay"] == (0.0 if no_wd else 0.05), name
            assert group["lr"] == pytest.approx(group["lr_scale"] * seen["kw"]["lr"] * 2 / 3), name  # last step's lr
    assert covered == set(names.values())

    line = log_lines(out)[0]
    assert set(line) == {"train_lr", "train_loss", "test_acc1", "test_acc5", "test_loss", "epoch", "n_parameters"}
    assert 0 <= stats["acc1"] <= 1 and line["test_acc1"] == pytest.approx(100 * stats["acc1"])
    saved = json.loads((out / "args.json").read_text())
    assert saved["patch_size"] == 4 and saved["lr"] == pytest.approx(1e-3 * 8 / 256)
    assert ckpt.torch_load(out / "checkpoint-0.pth")["epoch"] == 0


def test_digits_epoch_then_eval(tmp_path, pretrained):
    out = tmp_path / "out"
    stats = main_finetune.main(ft_args(out, "--batch_size", "256", "--aa", "", "--reprob", "0",
                                       dataset="digits", finetune=pretrained))
    assert 0 <= stats["acc1"] <= 1 and [line["epoch"] for line in log_lines(out)] == [0]
    assert json.loads((out / "args.json").read_text())["nb_classes"] == 10

    evaluated = main_finetune.main(ft_args(tmp_path / "eval", "--eval", "--resume", out / "checkpoint-last.pth",
                                           "--batch_size", "256", dataset="digits", model="vit_micro"))
    assert evaluated["acc1"] == pytest.approx(stats["acc1"]) and evaluated["acc5"] == pytest.approx(stats["acc5"])
    assert not (tmp_path / "eval").exists()


@pytest.mark.parametrize("model", ["simmim_vit_micro", "usimmim_vit_micro"])
def test_simmim_checkpoint_by_its_pretraining_name(tmp_path, folder, model, monkeypatch):
    """`--model [u]simmim_vit_*` (the README's promise) fine-tunes the `vit_*` of that encoder,
    initialised from the SimMIM checkpoint's encoder."""
    path = tmp_path / "simmim.pth"
    torch.manual_seed(2)
    source = create_model("simmim_vit_micro").state_dict()
    torch.save({"model": source, "epoch": 0}, path)
    seen = {}
    build = finetune.build_finetune_model

    def spy(name, *a, **kw):
        model = build(name, *a, **kw)
        seen.update(name=name, init={k: v.clone() for k, v in model.state_dict().items()})
        return model

    monkeypatch.setattr(finetune, "build_finetune_model", spy)
    stats = main_finetune.main(ft_args(tmp_path / "out", "--aa", "", "--reprob", "0", model=model,
                                       data_path=folder, finetune=path))
    assert seen["name"] == "vit_micro" and 0 <= stats["acc1"] <= 1
    key = "blocks.0.attn.qkv.weight"
    assert torch.equal(seen["init"][key], source[key])


def test_resume_auto_continues_with_the_saved_optimizer(tmp_path, folder, pretrained):
    out = tmp_path / "out"
    common = dict(data_path=folder, finetune=pretrained)
    main_finetune.main(ft_args(out, **common))
    saved = ckpt.torch_load(out / "checkpoint-last.pth")
    resumed = main_finetune.main(ft_args(out, "--epochs", "2", "--resume", "auto", **common))
    assert resumed["epoch"] == 1 and [line["epoch"] for line in log_lines(out)] == [0, 1]
    assert {p.name for p in out.glob("checkpoint-*.pth")} == {"checkpoint-0.pth", "checkpoint-1.pth", "checkpoint-last.pth"}

    model = create_model("vit_micro", num_classes=3, global_pool=True)
    optimizer = torch.optim.AdamW(finetune.param_groups_layer_decay(model, 0.05, 0.75, model.no_weight_decay()))
    assert classify.load_resume_state(saved, model, optimizer) == 1
    loaded = optimizer.state_dict()["state"]
    assert loaded.keys() == saved["optimizer"]["state"].keys() and loaded
    for i, state in saved["optimizer"]["state"].items():
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(loaded[i][key], state[key]), (i, key)


def test_non_finite_loss_stops_before_the_checkpoint(tmp_path, folder, pretrained, monkeypatch):
    out = tmp_path / "out"
    monkeypatch.setattr(finetune, "build_criterion", lambda args: lambda logits, target: logits.sum() * float("nan"))
    with pytest.raises(FloatingPointError, match="non-finite loss"):
        main_finetune.main(ft_args(out, data_path=folder, finetune=pretrained))
    assert not list(out.glob("checkpoint-*.pth")) and not (out / "log.txt").exists()


@pytest.mark.parametrize("flags, message", [
    (["--epochs", "-2"], "--epochs must be >= 0"),
    (["--layer_decay", "0"], "--layer_decay must be > 0"),
    (["--mixup", "0.8", "--batch_size", "7"], "even --batch_size"),
    (["--resume", "/nonexistent/ckpt.pth"], "/nonexistent/ckpt.pth"),
])
def test_bad_flags_exit_with_message(tmp_path, flags, message, capsys):
    with pytest.raises(SystemExit) as exc:
        main_finetune.main(ft_args(tmp_path, *flags, dataset="digits"))
    assert exc.value.code != 0
    assert message in capsys.readouterr().err


def test_missing_data_path_raises_before_the_model(tmp_path, monkeypatch):
    monkeypatch.setattr(finetune, "build_finetune_model", lambda *a, **kw: pytest.fail("model built before the data"))
    with pytest.raises(classify.data.DataError, match="/nonexistent/imagenet"):
        main_finetune.main(ft_args(tmp_path, data_path="/nonexistent/imagenet"))


def test_parser_defaults_match_upstream():
    args = main_finetune.get_args_parser().parse_args([])
    assert (args.batch_size, args.epochs, args.model, args.input_size, args.drop_path) == (64, 50, "vit_large_patch16", 224, 0.1)
    assert (args.clip_grad, args.weight_decay, args.lr, args.blr, args.layer_decay) == (None, 0.05, None, 1e-3, 0.75)
    assert (args.min_lr, args.warmup_epochs, args.color_jitter, args.aa, args.smoothing) == (1e-6, 5, None, "rand-m9-mstd0.5-inc1", 0.1)
    assert (args.reprob, args.remode, args.recount, args.resplit) == (0.25, "pixel", 1, False)
    assert (args.mixup, args.cutmix, args.cutmix_minmax, args.mixup_prob, args.mixup_switch_prob, args.mixup_mode) == \
        (0, 0, None, 1.0, 0.5, "batch")
    assert (args.global_pool, args.patch_size, args.dataset, args.amp, args.save_freq) == (True, None, "imagefolder", None, 20)
    assert main_finetune.get_args_parser().parse_args(["--cls_token"]).global_pool is False


def test_empty_output_dir_saves_nothing(tmp_path, folder, monkeypatch):
    monkeypatch.chdir(tmp_path)
    stats = main_finetune.main(ft_args("", "--aa", "", data_path=folder, model="vit_micro"))
    assert 0 <= stats["acc1"] <= 1 and list(tmp_path.iterdir()) == []
