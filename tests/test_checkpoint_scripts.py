"""The scripts' checkpoints describe their model: plain `torch.load(weights_only=True)` reads them,
`checkpoint.load_model` rebuilds the trained model from the file alone, and `--resume` checks the
flags against the checkpoint's model (refuses another architecture, takes what is left unset,
warns about other loss settings). Resuming restores the training state one way for every script."""
import argparse
import logging

import pytest
import torch

import main_finetune
import main_linprobe
import main_pretrain
from umae_plugin import checkpoint as ckpt
from umae_plugin import classify, cli, distributed, finetune, linprobe
from umae_plugin.errors import UsageError
from umae_plugin.registry import create_model

MICRO = ["--input_size", "32", "--patch_size", "4", "--embed_dim", "32", "--depth", "1", "--num_heads", "2",
         "--decoder_embed_dim", "16", "--decoder_depth", "1", "--decoder_num_heads", "2"]


def pretrain_argv(out, *extra, model="umae_vit_micro"):
    return ["--model", model, *MICRO, "--dataset", "digits", "--epochs", "1", "--warmup_epochs", "1",
            "--batch_size", "128", "--device", "cpu", "--num_workers", "0", "--erank_freq", "0",
            "--output_dir", str(out), "--log_dir", "", "--print_freq", "100", *map(str, extra)]


def pretrain_args(out, *extra, **kw):
    return main_pretrain.get_args_parser().parse_args(pretrain_argv(out, *extra, **kw))


def spy_builds(monkeypatch, module, name):
    """Keep the models `module.name` returns (the model a run trains)."""
    built, build = [], getattr(module, name)

    def spy(*a, **kw):
        model = build(*a, **kw)
        built.append(model)
        return model

    monkeypatch.setattr(module, name, spy)
    return built


def assert_rebuilt(path, trained):
    """Plain weights-only load; `load_model` rebuilds a model with the saved tensors whose outputs are
    the trained model's."""
    obj = torch.load(path, weights_only=True)  # no allow-list: plain values and tensors only
    assert isinstance(obj["args"], dict) and isinstance(obj["model_args"], dict)
    rebuilt = ckpt.load_model(path)
    saved, got = obj["model"], rebuilt.state_dict()
    assert list(got) == list(saved) and all(torch.equal(got[k], saved[k]) for k in saved)
    assert type(rebuilt) is type(trained) and not rebuilt.training
    trained.eval()
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(rebuilt.forward_features(x), trained.forward_features(x))
        if hasattr(trained, "decoder_pred"):
            torch.manual_seed(3)
            a = trained(x, 0.5)
            torch.manual_seed(3)
            b = rebuilt(x, 0.5)
            assert all(torch.equal(u, v) for u, v in zip(a[:3], b[:3]))
        else:
            assert torch.equal(rebuilt(x), trained(x))
    return obj


@pytest.fixture(scope="module")
def pretrain_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("pretrain")
    main_pretrain.main(pretrain_args(out, "--lambda_unif", "0.02"))
    return out


# ---------------------------------------------------------------------------------------------
# self-describing checkpoints


def test_pretrain_checkpoint_rebuilds_the_trained_model(tmp_path, monkeypatch):
    from umae_plugin import pretrain

    built = spy_builds(monkeypatch, pretrain.ckpt, "build_model")
    main_pretrain.main(pretrain_args(tmp_path, "--lambda_unif", "0.02", "--norm_pix_loss"))
    trained = next(m for m in built if m.cls_token.device.type != "meta")
    obj = assert_rebuilt(tmp_path / "checkpoint-last.pth", trained)
    assert obj["model_args"] == {"name": "umae_vit_micro", "kwargs": {
        "img_size": 32, "patch_size": 4, "embed_dim": 32, "depth": 1, "num_heads": 2, "decoder_embed_dim": 16,
        "decoder_depth": 1, "decoder_num_heads": 2, "norm_pix_loss": True, "lambda_unif": 0.02, "unif_pool": "mean",
        "reg": "square", "uniformity_mu": 1.0, "centering": False}}
    assert obj["args"]["model"] == "umae_vit_micro" and obj["args"]["mask_ratio"] == 0.75


def test_pretrain_with_lambda_zero_records_the_plain_model(tmp_path):
    main_pretrain.main(pretrain_args(tmp_path, "--lambda_unif", "0"))
    record = torch.load(tmp_path / "checkpoint-last.pth", weights_only=True)["model_args"]
    assert record["name"] == "mae_vit_micro" and "lambda_unif" not in record["kwargs"]


@pytest.fixture(scope="module")
def encoder_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("enc") / "pre.pth"
    torch.manual_seed(1)
    torch.save({"model": create_model("mae_vit_micro").state_dict(), "epoch": 0}, path)
    return path


def classify_argv(out, folder, encoder_file, *extra):
    return ["--model", "mae_vit_micro", "--dataset", "imagefolder", "--data_path", str(folder), "--epochs", "1",
            "--warmup_epochs", "1", "--batch_size", "8", "--nb_classes", "3", "--device", "cpu", "--num_workers",
            "0", "--output_dir", str(out), "--log_dir", "", "--print_freq", "100", "--finetune", str(encoder_file),
            *map(str, extra)]


def test_linprobe_checkpoint_rebuilds_the_trained_probe(tmp_path, folder, encoder_file, monkeypatch):
    built = spy_builds(monkeypatch, linprobe, "build_linprobe_model")
    main_linprobe.main(main_linprobe.get_args_parser().parse_args(classify_argv(tmp_path, folder, encoder_file)))
    obj = assert_rebuilt(tmp_path / "checkpoint-last.pth", built[0])
    record = obj["model_args"]
    assert record["name"] == "vit_micro" and record["head"] == "batchnorm"
    assert {k: record["kwargs"][k] for k in ("img_size", "patch_size", "num_classes", "global_pool")} == {
        "img_size": 32, "patch_size": 4, "num_classes": 3, "global_pool": False}


def test_finetune_checkpoint_rebuilds_the_trained_classifier(tmp_path, folder, encoder_file, monkeypatch):
    built = spy_builds(monkeypatch, finetune, "build_finetune_model")
    main_finetune.main(main_finetune.get_args_parser().parse_args(
        classify_argv(tmp_path, folder, encoder_file, "--input_size", "32")))
    obj = assert_rebuilt(tmp_path / "checkpoint-last.pth", built[0])
    record = obj["model_args"]
    assert record["name"] == "vit_micro" and "head" not in record
    assert (record["kwargs"]["global_pool"], record["kwargs"]["num_classes"]) == (True, 3)


# ---------------------------------------------------------------------------------------------
# --resume against the checkpoint's model


def test_resume_refuses_another_architecture(pretrain_run, capsys):
    argv = pretrain_argv(pretrain_run, "--resume", "auto", "--epochs", "2")
    argv[argv.index("--depth") + 1] = "2"
    with pytest.raises(SystemExit) as exit_:
        cli.run_main(main_pretrain.get_args_parser, main_pretrain.main, argv=argv)
    assert exit_.value.code == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert "--depth 2" in line and "depth 1" in line and "\n" not in line


def test_resume_flags_left_at_defaults_take_the_checkpoints_values(pretrain_run):
    parser = main_pretrain.get_args_parser()
    args = parser.parse_args(["--resume", "auto", "--output_dir", str(pretrain_run), "--device", "cpu"])
    args = main_pretrain.check_args(parser, args)
    assert (args.model, args.input_size, args.patch_size, args.embed_dim, args.depth) == ("umae_vit_micro", 32, 4, 32, 1)
    assert (args.decoder_embed_dim, args.lambda_unif, args.mask_ratio) == (16, 0.02, 0.75)


def test_resume_with_another_lambda_warns_and_keeps_the_flag(pretrain_run, caplog):
    parser = main_pretrain.get_args_parser()
    args = parser.parse_args(pretrain_argv(pretrain_run, "--lambda_unif", "0.05", "--resume", "auto"))
    with caplog.at_level(logging.WARNING):
        args = main_pretrain.check_args(parser, args)
    assert args.lambda_unif == 0.05
    assert any("--lambda_unif 0.05" in r.message and "0.02" in r.message for r in caplog.records)


def test_resume_from_an_old_format_checkpoint_with_namespace_args(pretrain_run, tmp_path):
    """Files written before the format change (a Namespace `args`, no "model_args") still resume."""
    obj = torch.load(pretrain_run / "checkpoint-last.pth", weights_only=True)
    del obj["model_args"]
    obj["args"] = argparse.Namespace(**obj["args"])
    torch.save(obj, tmp_path / "checkpoint-0.pth")
    stats = main_pretrain.main(pretrain_args(tmp_path, "--lambda_unif", "0.02", "--epochs", "2", "--resume", "auto"))
    assert stats["epoch"] == 1
    assert torch.load(tmp_path / "checkpoint-1.pth", weights_only=True)["model_args"]["name"] == "umae_vit_micro"


def test_classifier_resume_refuses_another_class_count(tmp_path, folder, encoder_file):
    parser = main_linprobe.get_args_parser()
    main_linprobe.main(parser.parse_args(classify_argv(tmp_path, folder, encoder_file)))
    argv = classify_argv(tmp_path, folder, encoder_file, "--resume", "auto", "--epochs", "2")
    argv[argv.index("--nb_classes") + 1] = "5"
    with pytest.raises(UsageError, match=r"--nb_classes 5 contradicts the checkpoint's nb_classes 3") as err:
        main_linprobe.main(parser.parse_args(argv))
    assert err.value.exit_code == 2


# ---------------------------------------------------------------------------------------------
# one restore for every script


def test_classification_resume_restores_the_rng_as_pretraining(monkeypatch):
    """One process continues the saved stream; with several, every rank gets its own stream from
    (seed, rank, epoch), for classification (`classify.load_resume_state`) as for pre-training
    (both go through `checkpoint.restore_training_state`)."""
    model = create_model("vit_micro", num_classes=3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    torch.manual_seed(11)
    state = ckpt.training_state(model, optimizer, 4, args={"seed": 5}, model_args=ckpt.model_args("vit_micro", {}),
                                device=torch.device("cpu"))
    saved = torch.get_rng_state()
    torch.manual_seed(0)
    assert classify.load_resume_state(state, model, optimizer, seed=5) == 5
    assert torch.equal(torch.get_rng_state(), saved)

    monkeypatch.setattr(distributed, "get_world_size", lambda: 2)
    monkeypatch.setattr(distributed, "get_rank", lambda: 1)
    assert classify.load_resume_state(state, model, optimizer, seed=5) == 5
    got = torch.get_rng_state()
    torch.manual_seed(5 + 1 + 100_003 * 5)
    assert torch.equal(got, torch.get_rng_state())
