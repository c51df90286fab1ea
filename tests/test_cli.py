"""The three scripts' command lines against the MAE reference's: defaults, `--local-rank`, help,
the start-up record of the arguments, and the one logger."""
import argparse
import copy
import importlib
import json
import logging
import pickle
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import main_finetune
import main_linprobe
import main_pretrain
import umae_plugin
from umae_plugin import cli, slurm
from umae_plugin.runtime import save_args, setup_runtime

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = {"pretrain": main_pretrain, "linprobe": main_linprobe, "finetune": main_finetune}

# The reference scripts' parser defaults (facebookresearch/mae, main_*.py, as released), written
# out here from the reference rather than read from our parsers.
_COMMON = dict(
    data_path="/datasets01/imagenet_full_size/061417/", output_dir="./output_dir", log_dir="./output_dir",
    device="cuda", seed=0, resume="", start_epoch=0, num_workers=10, pin_mem=True,
    world_size=1, local_rank=-1, dist_on_itp=False, dist_url="env://", lr=None,
)
_CLASSIFY = dict(_COMMON, model="vit_large_patch16", finetune="", nb_classes=1000, eval=False, dist_eval=False,
                 accum_iter=1)
UPSTREAM = {
    "pretrain": dict(_COMMON, batch_size=64, epochs=400, accum_iter=1, model="mae_vit_large_patch16", input_size=224,
                     mask_ratio=0.75, norm_pix_loss=False, weight_decay=0.05, blr=1e-3, min_lr=0.0, warmup_epochs=40),
    "linprobe": dict(_CLASSIFY, batch_size=512, epochs=90, weight_decay=0, blr=0.1, min_lr=0.0, warmup_epochs=10,
                     global_pool=False),
    "finetune": dict(_CLASSIFY, batch_size=64, epochs=50, input_size=224, drop_path=0.1, clip_grad=None,
                     weight_decay=0.05, blr=1e-3, layer_decay=0.75, min_lr=1e-6, warmup_epochs=5, color_jitter=None,
                     aa="rand-m9-mstd0.5-inc1", smoothing=0.1, reprob=0.25, remode="pixel", recount=1, resplit=False,
                     mixup=0, cutmix=0, cutmix_minmax=None, mixup_prob=1.0, mixup_switch_prob=0.5, mixup_mode="batch",
                     global_pool=True),
}


@pytest.mark.parametrize("script", SCRIPTS)
def test_parser_defaults_equal_upstream(script):
    args = vars(SCRIPTS[script].get_args_parser().parse_args([]))
    got = {k: args[k] for k in UPSTREAM[script]}
    assert got == UPSTREAM[script]
    for k, v in UPSTREAM[script].items():  # 0 vs 0.0 compare equal; the types must too (int flags stay int)
        assert type(got[k]) is type(v) or (v is None) or isinstance(v, float), k


# ---------------------------------------------------------------------------------------------
# --mask_ratio: upstream's 0.75 unless the model is SimMIM and the flag was not given


def checked(*argv):
    parser = main_pretrain.get_args_parser()
    return main_pretrain.check_args(parser, parser.parse_args(list(argv)))


def test_mask_ratio_default_is_upstreams_and_simmim_gets_its_own():
    assert main_pretrain.get_args_parser().parse_args([]).mask_ratio == 0.75
    mae = checked("--model", "mae_vit_base_patch16")
    assert mae.mask_ratio == 0.75 and type(mae.mask_ratio) is float
    simmim = checked("--model", "simmim_vit_base_patch16")
    assert simmim.mask_ratio == 0.6 and type(simmim.mask_ratio) is float
    assert checked("--model", "usimmim_vit_base_patch16", "--mask_ratio", "0.75").mask_ratio == 0.75


def test_mask_ratio_set_by_hand_means_what_it_says():
    parser = main_pretrain.get_args_parser()
    args = parser.parse_args(["--model", "simmim_vit_base_patch16"])
    args.mask_ratio = 0.75  # a namespace built or edited by hand: a plain float is a choice
    assert main_pretrain.check_args(parser, args).mask_ratio == 0.75


def test_mask_ratio_marker_survives_the_launcher_round_trip():
    """The launcher deep-copies and pickles unchecked namespaces; the job resolves them."""
    args = main_pretrain.get_args_parser().parse_args(["--model", "simmim_vit_base_patch16"])
    for clone in (copy.deepcopy(args), pickle.loads(pickle.dumps(args))):
        assert isinstance(clone.mask_ratio, cli.DefaultMaskRatio)
        assert main_pretrain.check_args(main_pretrain.get_args_parser(), clone).mask_ratio == 0.6


# ---------------------------------------------------------------------------------------------
# --local-rank (torch.distributed.launch in torch 2) inside the parsers


@pytest.mark.parametrize("script", SCRIPTS)
@pytest.mark.parametrize("argv", [["--local-rank=3"], ["--local-rank", "3"], ["--local_rank=3"], ["--local_rank", "3"]])
def test_local_rank_both_spellings_through_a_parent_parser(script, argv):
    wrapper = argparse.ArgumentParser(parents=[SCRIPTS[script].get_args_parser()])  # a user's wrapper
    assert wrapper.parse_args(argv).local_rank == 3


def test_launcher_accepts_the_reference_local_rank():
    _, args = slurm.parse_args(["pretrain", "--job_dir", "/j/%j", "--nodes", "1", "--local-rank=2"], environ={})
    assert args.local_rank == 2


def test_no_argv_rewrite_is_left():
    sources = [p.read_text() for p in [*ROOT.glob("main_*.py"), *(ROOT / "umae_plugin").rglob("*.py")]]
    assert not any("accept_local_rank_alias" in s for s in sources)


# ---------------------------------------------------------------------------------------------
# --help


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_flag_has_help_and_a_group(script):
    parser = SCRIPTS[script].get_args_parser()
    assert parser.formatter_class is argparse.ArgumentDefaultsHelpFormatter
    missing = [a.option_strings[0] for a in parser._actions if not (a.help or "").strip()]
    assert missing == []
    assert cli.ungrouped_actions(parser) == []
    titles = {g.title for g in parser._action_groups}
    assert {cli.MODEL, cli.OPTIM, cli.DATA, cli.DIST, cli.LOGGING} <= titles
    assert (cli.UNIFORMITY in titles) == (script == "pretrain")


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_shows_reference_wording_and_defaults(script):
    out = subprocess.run([sys.executable, f"main_{script}.py", "--help"], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    text = " ".join(out.stdout.split())
    assert "absolute_lr = base_lr * total_batch_size / 256" in text
    assert "path where to save, empty for no saving (default: ./output_dir)" in text
    assert "--local_rank LOCAL_RANK, --local-rank LOCAL_RANK" in text
    assert "distributed:" in out.stdout and "optimisation:" in out.stdout


def test_launcher_help_shows_the_scripts_groups_and_defaults(capsys):
    with pytest.raises(SystemExit) as exit_:
        slurm.parse_args(["pretrain", "--help"], environ={})
    assert exit_.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "launcher (submitit / SLURM):" in text and "U-MAE (uniformity term):" in text
    assert "base learning rate: absolute_lr = base_lr * total_batch_size / 256 (default: 0.001)" in text
    assert "(default: 0.75)" in text


# ---------------------------------------------------------------------------------------------
# the arguments, logged at start and kept in args.json


def test_args_json_keeps_an_earlier_different_run(tmp_path):
    first, second = argparse.Namespace(lr=1.0, epochs=2), argparse.Namespace(lr=2.0, epochs=2)
    save_args(first, tmp_path)
    save_args(first, tmp_path)  # the same content: nothing to keep
    assert sorted(p.name for p in tmp_path.iterdir()) == ["args.json"]
    save_args(second, tmp_path)
    assert json.loads((tmp_path / "args.json").read_text())["lr"] == 2.0
    assert json.loads((tmp_path / "args.1.json").read_text())["lr"] == 1.0
    save_args(first, tmp_path)
    assert json.loads((tmp_path / "args.2.json").read_text())["lr"] == 2.0
    assert json.loads((tmp_path / "args.json").read_text())["lr"] == 1.0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["args.1.json", "args.2.json", "args.json"]


def test_resolved_arguments_are_logged_once_at_start(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="umae")
    args = main_pretrain.get_args_parser().parse_args([
        "--model", "simmim_vit_micro", "--dataset", "digits", "--input_size", "32", "--epochs", "1",
        "--batch_size", "256", "--device", "cpu", "--num_workers", "0", "--erank_freq", "0",
        "--output_dir", str(tmp_path), "--log_dir", ""])
    main_pretrain.main(args)
    starts = [r.getMessage() for r in caplog.records if r.getMessage().startswith("arguments:")]
    assert len(starts) == 1
    assert "  mask_ratio: 0.6\n" in starts[0] and "  lr: " in starts[0] and "  lr: None" not in starts[0]
    assert json.loads((tmp_path / "args.json").read_text())["mask_ratio"] == 0.6


def test_flags_the_launchers_environment_overrides_are_named_once(monkeypatch, caplog):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    caplog.set_level(logging.INFO, logger="umae")
    setup_runtime("cpu", 0, None, dist_url="tcp://10.0.0.1:23456", world_size=4, dist_on_itp=True)
    lines = [r.getMessage() for r in caplog.records if "ignoring" in r.getMessage()]
    assert lines == ["the process group comes from the launcher's environment (RANK, WORLD_SIZE): ignoring "
                     "--dist_on_itp, --dist_url tcp://10.0.0.1:23456, --world_size 4"]


# ---------------------------------------------------------------------------------------------
# one logger


def test_every_module_logs_under_umae():
    names = {}
    for info in pkgutil.walk_packages(umae_plugin.__path__, "umae_plugin."):
        module = importlib.import_module(info.name)
        logger = getattr(module, "log", None)
        if isinstance(logger, logging.Logger):
            names[info.name] = logger.name
    assert {"umae_plugin.data", "umae_plugin.checkpoint", "umae_plugin.distributed"} <= set(names)
    assert {m: n for m, n in names.items() if n != "umae" and not n.startswith("umae.")} == {}
    assert not [n for n in logging.Logger.manager.loggerDict if n.startswith("umae_plugin")]
