"""Pre-training runs refuse what cannot work before anything is written, and a finished run asked
to resume reports its final stats."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import main_finetune
import main_linprobe
import main_pretrain
from umae_plugin.checkpoint import CheckpointMismatchError
from umae_plugin.data import make_synthetic_imagefolder
from umae_plugin.errors import UsageError
from umae_plugin.registry import build_pretrain_model

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--model", "mae_vit_tiny_patch16", "--input_size", "32", "--patch_size", "4", "--embed_dim", "32",
        "--depth", "1", "--num_heads", "2", "--decoder_embed_dim", "16", "--decoder_depth", "1",
        "--decoder_num_heads", "2"]


def parse(*argv):
    return main_pretrain.get_args_parser().parse_args([str(a) for a in argv])


def refused(capsys, *argv):
    parser = main_pretrain.get_args_parser()
    with pytest.raises(SystemExit) as exit_:
        main_pretrain.check_args(parser, parser.parse_args([str(a) for a in argv]))
    assert exit_.value.code == 2
    return capsys.readouterr().err.strip().splitlines()[-1]


def test_finished_run_asked_to_resume_reports_its_final_stats(tmp_path):
    argv = [*TINY, "--dataset", "digits", "--epochs", "1", "--warmup_epochs", "1", "--batch_size", "256",
            "--device", "cpu", "--num_workers", "0", "--erank_samples", "20", "--output_dir", tmp_path,
            "--log_dir", "", "--resume", "auto"]
    first = main_pretrain.main(parse(*argv))
    again = main_pretrain.main(parse(*argv))  # resumes at the final epoch: nothing left to train
    assert again["epoch"] == first["epoch"] == 0
    for key in ("train_loss", "train_loss_mae", "train_lr", "effective_rank_mean", "effective_rank_init_cls"):
        assert again[key] == pytest.approx(first[key]), key


def test_quickstart_runs_twice(tmp_path):
    """The README's first command, run a second time in the same folder (it resumes with 'auto')."""
    cmd = [sys.executable, "-m", "umae_plugin.quickstart", "--output_dir", str(tmp_path / "qs"), "--epochs", "1",
           "--probe_epochs", "2"]
    outs = [subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600) for _ in range(2)]
    for out in outs:
        assert out.returncode == 0, out.stderr[-2000:]
    table = [line for line in outs[1].stdout.splitlines() if line.startswith("| loss_mae")]
    assert table and table[0] in outs[0].stdout  # the same pre-training numbers, read back


# ---------------------------------------------------------------------------------------------
# a batch larger than the data: refused before anything is written, in all three scripts


@pytest.fixture
def six_images(tmp_path):
    return make_synthetic_imagefolder(tmp_path / "data", num_classes=2, per_class=3, size=32)


def test_pretrain_refuses_a_batch_larger_than_the_data(tmp_path, six_images):
    out = tmp_path / "out"
    args = parse(*TINY, "--data_path", six_images, "--batch_size", "8", "--epochs", "1", "--device", "cpu",
                 "--num_workers", "0", "--output_dir", out, "--log_dir", out)
    with pytest.raises(UsageError, match=r"--batch_size 8 is larger than the 6 training images"):
        main_pretrain.main(args)
    assert not out.exists()


@pytest.mark.parametrize("script", [main_linprobe, main_finetune])
def test_classification_refuses_a_batch_larger_than_the_data(tmp_path, six_images, script):
    out = tmp_path / "out"
    args = script.get_args_parser().parse_args([
        "--model", "vit_tiny_patch16", "--input_size", "32", "--patch_size", "4", "--data_path", str(six_images),
        "--nb_classes", "2", "--batch_size", "8", "--epochs", "1", "--device", "cpu", "--num_workers", "0",
        "--output_dir", str(out), "--log_dir", str(out)])
    with pytest.raises(UsageError, match=r"--batch_size 8 is larger than the 6 training images"):
        script.main(args)
    assert not out.exists()


# ---------------------------------------------------------------------------------------------
# masking that leaves nothing to learn, sizes the patch does not divide, unknown models


@pytest.mark.parametrize("ratio, message", [
    ("0", "--mask_ratio 0.0 keeps 64 of 64 patches (32 px, patch 4) visible"),
    ("0.99", "--mask_ratio 0.99 keeps 0 of 64 patches (32 px, patch 4) visible"),
])
def test_mae_mask_ratio_needs_a_visible_and_a_masked_patch(capsys, ratio, message):
    line = refused(capsys, *TINY, "--mask_ratio", ratio)
    assert message in line and "at least one visible and one masked patch" in line


def test_mae_mask_ratio_edges_that_work():
    parser = main_pretrain.get_args_parser()
    for ratio in ("0.015", "0.98"):  # int(64 * 0.985) = 63 visible; int(64 * 0.02) = 1 visible
        main_pretrain.check_args(parser, parser.parse_args([*TINY, "--mask_ratio", ratio]))


def test_simmim_needs_a_masked_block(capsys):
    line = refused(capsys, "--model", "simmim_vit_tiny_patch16", "--input_size", "32", "--patch_size", "4",
                   "--mask_ratio", "0")
    assert "masks none of the 16 mask blocks of 64 patches" in line
    line = refused(capsys, "--model", "simmim_vit_tiny_patch16", "--input_size", "48", "--patch_size", "16")
    assert "3x3 patch grid is not a multiple of SimMIM's 2x2 mask blocks" in line


def test_input_size_checked_against_the_models_own_patch(capsys):
    line = refused(capsys, "--model", "mae_vit_base_patch16", "--input_size", "40")
    assert "--input_size 40 is not a multiple of the patch size 16" in line


def test_unknown_model_refused_before_the_data_is_read(capsys):
    line = refused(capsys, "--model", "mae_vit_gigantic_patch16", "--data_path", "/nonexistent/data")
    assert "--model mae_vit_gigantic_patch16" in line and "/nonexistent" not in line


# ---------------------------------------------------------------------------------------------
# checkpoints that do not fit: one line naming the flag and the file


def test_resume_from_another_architecture_is_one_line(tmp_path):
    other = tmp_path / "other.pth"
    torch.save({"model": {"w": torch.zeros(2)}, "optimizer": {}, "epoch": 3}, other)
    out = subprocess.run([sys.executable, "main_pretrain.py", *TINY, "--dataset", "digits", "--device", "cpu",
                          "--num_workers", "0", "--epochs", "1", "--output_dir", str(tmp_path / "out"),
                          "--log_dir", "", "--resume", str(other)], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 1 and "Traceback" not in out.stderr
    line = out.stderr.strip().splitlines()[-1]
    assert line.startswith(f"error: --resume {other}: not a checkpoint of this run's model") and "RuntimeError" in line


def test_init_from_another_architecture_names_the_flag(tmp_path):
    wide = tmp_path / "wide.pth"
    model = build_pretrain_model("mae_vit_tiny_patch16", lambda_unif=0.0, img_size=32, patch_size=4, embed_dim=64,
                                 depth=1, num_heads=2, decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2)
    torch.save({"model": model.state_dict()}, wide)
    args = parse(*TINY, "--dataset", "digits", "--device", "cpu", "--num_workers", "0", "--epochs", "1",
                 "--output_dir", "", "--log_dir", "", "--init_from", wide)
    with pytest.raises(CheckpointMismatchError, match=rf"^--init_from {wide}: "):
        main_pretrain.main(args)
