import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import main_pretrain
from umae_plugin import checkpoint as ckpt
from umae_plugin import pretrain
from umae_plugin.data import make_synthetic_imagefolder
from umae_plugin.models_mae import MaskedAutoencoderViT

ROOT = Path(__file__).resolve().parents[1]


def parse(*argv):
    return main_pretrain.get_args_parser().parse_args(list(argv))


def micro_args(out, *extra, model="umae_vit_micro", dataset="digits", data_path=None):
    argv = ["--model", model, "--dataset", dataset, "--input_size", "32", "--epochs", "1",
            "--warmup_epochs", "1", "--batch_size", "128", "--device", "cpu", "--num_workers", "0",
            "--output_dir", str(out), "--log_dir", str(out), "--print_freq", "5", "--erank_samples", "20"]
    if data_path:
        argv += ["--data_path", str(data_path)]
    return parse(*argv, *extra)


def log_lines(out):
    return [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]


def test_digits_epoch_end_to_end(tmp_path):
    stats = main_pretrain.main(micro_args(tmp_path, "--online_probe"))
    line = log_lines(tmp_path)[0]
    for key in ("train_loss", "train_loss_mae", "train_loss_unif", "train_lr", "effective_rank_mean",
                "online_probe_masked_acc1", "online_probe_unmasked_acc1", "epoch"):
        assert key in line, key
    assert "effective_rank" not in line and "online_probe_acc1" not in line  # the ambiguous keys are gone
    assert line["train_loss"] == pytest.approx(line["train_loss_mae"] + 0.01 * line["train_loss_unif"], rel=1e-4)
    assert 1.0 <= stats["effective_rank_mean"] <= 20
    saved = json.loads((tmp_path / "args.json").read_text())
    assert saved["lambda_unif"] == 0.01 and saved["model"] == "umae_vit_micro"
    state = ckpt.torch_load(tmp_path / "checkpoint-last.pth")
    assert state["epoch"] == 0 and set(state) >= {"model", "optimizer", "epoch", "scaler", "args", "online_probe"}
    assert "fc.weight" not in state["model"]  # the probe lives outside `model`
    assert (tmp_path / "checkpoint-0.pth").exists()


def test_imagefolder_epoch_with_a_corrupt_image(tmp_path, caplog):
    root = make_synthetic_imagefolder(tmp_path / "data", num_classes=2, per_class=10)
    bad = next((root / "train").rglob("*.png"))
    bad.write_bytes(b"not an image")
    out = tmp_path / "out"
    main_pretrain.main(micro_args(out, "--batch_size", "4", model="mae_vit_micro", dataset="imagefolder", data_path=root))
    assert "train_loss_unif" not in log_lines(out)[0]  # mae_* defaults to lambda 0: upstream MAE
    assert str(bad) in caplog.text


def test_resume_is_exact(tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    main_pretrain.main(micro_args(full, "--epochs", "2"))
    main_pretrain.main(micro_args(part, "--epochs", "2"))  # same run, then kill the second epoch's trace
    state0 = ckpt.torch_load(part / "checkpoint-0.pth")
    for f in ("checkpoint-1.pth", "checkpoint-last.pth"):
        (part / f).unlink()
    lines = (part / "log.txt").read_text().splitlines()
    (part / "log.txt").write_text(lines[0] + "\n")
    main_pretrain.main(micro_args(part, "--epochs", "2", "--resume", "auto"))

    a, b = ckpt.torch_load(full / "checkpoint-1.pth"), ckpt.torch_load(part / "checkpoint-1.pth")
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], rtol=0, atol=0, msg=k)
    assert [line["epoch"] for line in log_lines(part)] == [0, 1]
    # the resumed optimizer started from exactly the saved state
    opt_a = state0["optimizer"]["state"]
    assert all(torch.equal(opt_a[i]["exp_avg"], ckpt.torch_load(full / "checkpoint-0.pth")["optimizer"]["state"][i]["exp_avg"])
               for i in opt_a)


def test_lost_log_line_is_restored_on_resume(tmp_path):
    main_pretrain.main(micro_args(tmp_path))
    (tmp_path / "log.txt").write_text("")  # killed between the checkpoint and the log line
    main_pretrain.main(micro_args(tmp_path, "--epochs", "2", "--resume", "auto"))
    assert [line["epoch"] for line in log_lines(tmp_path)] == [0, 1]


def test_non_finite_loss_stops_and_keeps_last_checkpoint(tmp_path, monkeypatch):
    main_pretrain.main(micro_args(tmp_path))
    before = (tmp_path / "checkpoint-last.pth").read_bytes()
    monkeypatch.setattr(MaskedAutoencoderViT, "forward_loss", lambda self, imgs, pred, mask: (pred * float("nan")).mean())
    with pytest.raises(FloatingPointError, match="non-finite loss"):
        main_pretrain.main(micro_args(tmp_path, "--epochs", "2", "--resume", "auto"))
    assert (tmp_path / "checkpoint-last.pth").read_bytes() == before
    assert not (tmp_path / "checkpoint-1.pth").exists()


def test_init_from_and_lambda_resolution(tmp_path):
    main_pretrain.main(micro_args(tmp_path / "a", model="mae_vit_micro"))
    args = micro_args(tmp_path / "b", "--init_from", str(tmp_path / "a" / "checkpoint-0.pth"), "--lamb", "0.5")
    main_pretrain.main(args)
    assert args.lambda_unif == 0.5
    assert json.loads((tmp_path / "b" / "args.json").read_text())["init_from"].endswith("checkpoint-0.pth")
    none = micro_args(tmp_path / "c", "--reg", "none")
    main_pretrain.check_args(main_pretrain.get_args_parser(), none)
    assert none.lambda_unif == 0.0


@pytest.mark.parametrize("flags, message", [
    (["--mask_ratio", "1.5"], "--mask_ratio must be in [0, 1)"),
    (["--lambda_unif", "-1"], "--lambda_unif must be >= 0"),
    (["--data_path", "/nonexistent/imagenet"], "/nonexistent/imagenet"),
])
def test_bad_flags_exit_with_message(flags, message):
    proc = subprocess.run([sys.executable, "main_pretrain.py", "--device", "cpu", "--model", "mae_vit_tiny_patch16",
                           "--input_size", "32", "--patch_size", "4", *flags],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert message in proc.stderr


def test_resume_is_exact_with_dataloader_workers(tmp_path):
    """Persistent DataLoader workers must not carry augmentation randomness across epochs: a run
    killed after epoch 0 and resumed equals the uninterrupted one, bit for bit."""
    full, part = tmp_path / "full", tmp_path / "part"
    flags = ("--epochs", "2", "--num_workers", "2")
    main_pretrain.main(micro_args(full, *flags))
    main_pretrain.main(micro_args(part, *flags))  # same run, then kill the second epoch's trace
    for f in ("checkpoint-1.pth", "checkpoint-last.pth"):
        (part / f).unlink()
    lines = (part / "log.txt").read_text().splitlines()
    (part / "log.txt").write_text(lines[0] + "\n")
    main_pretrain.main(micro_args(part, *flags, "--resume", "auto"))

    a, b = ckpt.torch_load(full / "checkpoint-1.pth"), ckpt.torch_load(part / "checkpoint-1.pth")
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], rtol=0, atol=0, msg=k)
    assert [line["epoch"] for line in log_lines(part)] == [0, 1]
    assert log_lines(part)[1]["train_loss"] == log_lines(full)[1]["train_loss"]


def test_bad_images_are_logged_per_epoch_over_workers(tmp_path, caplog):
    root = make_synthetic_imagefolder(tmp_path / "data", num_classes=2, per_class=10)
    bad = next((root / "train").rglob("*.png"))
    bad.write_bytes(b"not an image")
    out = tmp_path / "out"
    with caplog.at_level("WARNING"):
        main_pretrain.main(micro_args(out, "--batch_size", "4", "--epochs", "2", "--num_workers", "2",
                                      model="mae_vit_micro", dataset="imagefolder", data_path=root))
    assert [line["train_bad_images"] for line in log_lines(out)] == [1, 1]
    warned = [r for r in caplog.records if r.levelname == "WARNING" and str(bad) in r.getMessage()]
    assert len(warned) == 2  # once per epoch, however many workers met it


# ---------------------------------------------------------------------------------------------
# protocols: collapse measures of both pools (also at initialisation), online probe on masked and
# unmasked val views


COLLAPSE_KEYS = [f"{name}_{pool}" for name in ("effective_rank", "effective_rank_centered", "unif")
                 for pool in ("mean", "cls")]
INIT_KEYS = [f"{name}_init_{pool}" for name in ("effective_rank", "effective_rank_centered", "unif")
             for pool in ("mean", "cls")]
PROBE_KEYS = [f"online_probe_{view}_acc{k}" for view in ("masked", "unmasked") for k in (1, 5)]


def test_feature_pool_flag_and_erank_samples_default():
    args = main_pretrain.check_args(main_pretrain.get_args_parser(), parse("--model", "umae_vit_micro",
                                                                           "--input_size", "32"))
    assert args.feature_pool == "mean" and args.erank_samples == 1024
    args = main_pretrain.check_args(main_pretrain.get_args_parser(), parse(
        "--model", "umae_vit_micro", "--input_size", "32", "--unif_pool", "cls"))
    assert args.feature_pool == "cls"  # None: the model's --unif_pool
    args = main_pretrain.check_args(main_pretrain.get_args_parser(), parse(
        "--model", "mae_vit_micro", "--input_size", "32", "--unif_pool", "cls", "--feature_pool", "mean"))
    assert args.feature_pool == "mean"
    with pytest.raises(SystemExit):
        parse("--feature_pool", "max")


def test_mae_run_logs_both_pools_at_init_and_per_epoch_and_tensorboard(tmp_path, monkeypatch):
    from umae_plugin.logger import RunLog

    seen = {}
    monkeypatch.setattr(RunLog, "scalars", lambda self, values, step: seen.update({k: step for k in values}))
    main_pretrain.main(micro_args(tmp_path, "--epochs", "2", "--online_probe", "--feature_pool", "cls",
                                  model="mae_vit_micro"))
    first, second = log_lines(tmp_path)
    assert "train_loss_unif" not in first  # plain MAE: no per-step uniformity term, yet unif_* is measured
    for key in COLLAPSE_KEYS + INIT_KEYS + PROBE_KEYS:
        assert key in first, key
    for key in COLLAPSE_KEYS + PROBE_KEYS:
        assert key in second, key
        assert seen[key] == 2000  # TensorBoard scalar at the end of epoch 1
    assert not any(k in second for k in INIT_KEYS)  # initial values on the epoch-0 line only
    assert all(seen[k] == 0 for k in INIT_KEYS)
    for line in (first, second):
        for pool in ("mean", "cls"):
            assert 1.0 <= line[f"effective_rank_{pool}"] <= 20
            assert 0.0 < line[f"effective_rank_centered_{pool}"] <= 20
            assert 1 / 20 - 1e-6 <= line[f"unif_{pool}"] <= 1.0
        for key in PROBE_KEYS:
            assert 0.0 <= line[key] <= 1.0
    assert first["effective_rank_init_mean"] != first["effective_rank_mean"]  # measured before training


def test_resumed_run_does_not_measure_at_init(tmp_path):
    main_pretrain.main(micro_args(tmp_path))
    main_pretrain.main(micro_args(tmp_path, "--epochs", "2", "--resume", "auto"))
    first, second = log_lines(tmp_path)
    assert all(k in first for k in INIT_KEYS) and not any(k in second for k in INIT_KEYS)
    assert all(k in second for k in COLLAPSE_KEYS)


# ---------------------------------------------------------------------------------------------
# the uniformity family: M-MAE's command line and its flags


MMAE_FLAGS = ["--batch_size", "128", "--model", "mae_vit_tiny_patch16", "--norm_pix_loss", "--mask_ratio", "0.75",
              "--epochs", "1", "--warmup_epochs", "1", "--blr", "1.5e-4", "--weight_decay", "0.05",
              "--data_path", "unused-by-digits", "--lamb", "1e-2", "--uniformity_mu", "3", "--reg", "TCR",
              "--centering", "False"]
TINY = ["--input_size", "32", "--patch_size", "4", "--embed_dim", "32", "--depth", "1", "--num_heads", "2",
        "--decoder_embed_dim", "16", "--decoder_depth", "1", "--decoder_num_heads", "2"]


@pytest.mark.slow  # a subprocess: about 30 s on a busy 2-core machine
def test_mmae_documented_command_line_runs_on_digits(tmp_path):
    """M-MAE's pretrain.sh (`torch.distributed.launch --nproc_per_node=8 main_pretrain.py ...`) with the
    ImageNet model, data and epochs replaced by tiny ones; every M-MAE flag kept as spelled, and the
    `--local-rank=0` torch.distributed.launch appends."""
    out = tmp_path / "mmae"
    proc = subprocess.run([sys.executable, "main_pretrain.py", *MMAE_FLAGS, "--output_dir", str(out), "--log_dir",
                           str(out), *TINY, "--dataset", "digits", "--device", "cpu", "--num_workers", "0",
                           "--erank_samples", "20", "--local-rank=0"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = log_lines(out)[0]
    assert "train_loss_unif" not in line and line["train_loss_tcr"] < 0
    assert line["train_loss"] == pytest.approx(line["train_loss_mae"] + 0.01 * line["train_loss_tcr"], rel=1e-4)
    record = ckpt.torch_load(out / "checkpoint-last.pth")["model_args"]
    assert record["name"] == "umae_vit_tiny_patch16"
    assert {k: record["kwargs"][k] for k in ("lambda_unif", "reg", "uniformity_mu", "centering")} == {
        "lambda_unif": 0.01, "reg": "TCR", "uniformity_mu": 3.0, "centering": False}


@pytest.mark.parametrize("flag", ["--local_rank=0", "--local-rank=0"])
def test_torch_distributed_launch_flags_parse(flag):
    args = parse(*MMAE_FLAGS, flag)
    assert args.local_rank == 0 and args.lambda_unif == 0.01 and args.reg == "TCR"
    assert args.uniformity_mu == 3.0 and args.centering is False


def test_term_flags_resolve():
    def checked(*argv):
        return main_pretrain.check_args(main_pretrain.get_args_parser(), parse("--input_size", "32", *argv))

    assert parse("--centering").centering is True and parse("--centering", "--reg", "TCR").centering is True
    assert parse("--centering", "yes").centering is True and parse().centering is False
    assert parse("--uniformity_lamda", "2").uniformity_mu == 2.0  # the spelling of copies of M-MAE's scripts
    assert parse().reg is None and parse().unif_gather == "global" and parse().knn_freq == 0
    for alias in ("spectral", "entropy"):  # the U-MAE reference's names of its term
        assert checked("--model", "umae_vit_micro", "--reg", alias).reg == "square"
    assert checked("--model", "mae_vit_micro", "--reg", "none", "--lamb", "0.5").lambda_unif == 0.0
    args = checked("--model", "mae_vit_micro", "--reg", "TCR", "--lamb", "0.01", "--unif_gather", "reference")
    record = pretrain.pretrain_model_args(args)
    assert record["name"] == "umae_vit_micro" and record["kwargs"]["reg"] == "TCR"


def test_term_with_lambda_zero_warns(caplog):
    with caplog.at_level("WARNING"):
        args = main_pretrain.check_args(main_pretrain.get_args_parser(),
                                        parse("--model", "mae_vit_micro", "--input_size", "32", "--reg", "TCR"))
    assert args.lambda_unif == 0.0 and "--reg TCR with lambda_unif 0" in caplog.text
    assert pretrain.pretrain_model_args(args)["name"] == "mae_vit_micro"  # exactly MAE


@pytest.mark.parametrize("flags, message", [
    (["--centering", "maybe"], "expected a boolean"),
    (["--uniformity_mu", "0"], "--uniformity_mu must be a finite number > 0"),
    (["--reg", "logdet"], "invalid choice: 'logdet'"),
    (["--unif_gather", "local"], "invalid choice: 'local'"),
    (["--knn_freq", "-1"], "--knn_freq must be >= 0"),
    (["--knn_freq", "1", "--knn_bank", "0"], "--knn_bank must be >= 1"),
])
def test_bad_term_and_knn_flags_exit_with_message(flags, message, capsys):
    with pytest.raises(SystemExit) as exc:
        main_pretrain.check_args(main_pretrain.get_args_parser(),
                                 main_pretrain.get_args_parser().parse_args(["--input_size", "32", "--patch_size", "4",
                                                                             *flags]))
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_resume_takes_the_term_from_the_checkpoint(tmp_path):
    main_pretrain.main(micro_args(tmp_path, "--reg", "TCR", "--uniformity_mu", "3", "--centering"))
    args = micro_args(tmp_path, "--epochs", "2", "--resume", "auto")  # no term flags: the checkpoint's
    main_pretrain.main(args)
    assert (args.reg, args.uniformity_mu, args.centering, args.lambda_unif) == ("TCR", 3.0, True, 0.01)
    assert all("train_loss_tcr" in line for line in log_lines(tmp_path))
