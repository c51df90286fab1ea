"""sweep tool: values taken from the right log lines, linear-probe results found, rows sorted by
lambda, on hand-made run folders."""
import csv
import json

import pytest
from PIL import Image

from umae_plugin.analysis import sweep
from umae_plugin.analysis.__main__ import main as cli


def write_lines(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def make_sweep(root):
    # lambda 0.01: args.json; effective rank not logged on the last epoch; online probe only early;
    # a main_linprobe log whose last line has test_acc1.
    a = root / "lambda_unif=0.01"
    write_lines(a / "log.txt", [
        {"epoch": 0, "train_loss": 0.9, "train_loss_mae": 0.8, "train_loss_unif": -1.0, "effective_rank_mean": 10.0,
         "online_probe_masked_acc1": 0.30, "online_probe_unmasked_acc1": 0.35},
        {"epoch": 1, "train_loss": 0.7, "train_loss_mae": 0.6, "train_loss_unif": -2.0, "effective_rank_mean": 20.0,
         "effective_rank_cls": 15.0, "effective_rank_centered_mean": 19.0, "effective_rank_centered_cls": 14.0},
        {"epoch": 2, "train_loss": 0.5, "train_loss_mae": 0.4, "train_loss_unif": -3.0},
    ])
    (a / "args.json").write_text(json.dumps({"model": "umae_vit_tiny_patch16", "lambda_unif": 0.01}))
    write_lines(a / "linprobe" / "log.txt", [{"epoch": 0, "test_acc1": 40.0}, {"epoch": 1, "test_acc1": 45.5},
                                             {"epoch": 1, "train_lr": 0.1}])
    (a / "linprobe" / "args.json").write_text("{}")  # a probe folder is not a run
    # lambda 0: plain MAE, linprobe.json.
    b = root / "lambda_unif=0"
    write_lines(b / "log.txt", [{"epoch": 0, "train_loss": 0.6, "train_loss_mae": 0.6, "effective_rank_mean": 4.0,
                                 "online_probe_masked_acc1": 0.2, "online_probe_unmasked_acc1": 0.25}])
    (b / "args.json").write_text(json.dumps({"model": "mae_vit_tiny_patch16", "lambda_unif": 0.0}))
    (b / "linprobe.json").write_text(json.dumps({"acc1": 0.41}))
    # lambda 0.001: no args.json (lambda from the folder name), no probe of any kind.
    write_lines(root / "lambda_unif=0.001" / "log.txt", [{"epoch": 0, "train_loss": 0.65}, {"epoch": 1, "train_loss": 0.62}])
    return a, b


def test_summarize_run_takes_last_line_with_each_key(tmp_path):
    a, b = make_sweep(tmp_path)
    row = sweep.summarize_run(a)
    assert row["lambda_unif"] == 0.01 and row["epochs"] == 3 and row["model"] == "umae_vit_tiny_patch16"
    assert (row["train_loss"], row["train_loss_mae"], row["train_loss_unif"]) == (0.5, 0.4, -3.0)
    assert row["effective_rank_mean"] == 20.0 and row["online_probe_masked_acc1"] == pytest.approx(30.0)  # fraction -> %
    assert row["online_probe_unmasked_acc1"] == pytest.approx(35.0)
    assert (row["effective_rank_cls"], row["effective_rank_centered_mean"], row["effective_rank_centered_cls"]) == (
        15.0, 19.0, 14.0)
    assert "effective_rank" not in row and "online_probe_acc1" not in row
    assert row["linprobe_acc1"] == 45.5 and row["linprobe_source"].endswith("linprobe/log.txt")
    row = sweep.summarize_run(b)
    assert row["linprobe_acc1"] == pytest.approx(41.0) and row["train_loss_unif"] is None  # linprobe.json acc1: fraction -> %
    row = sweep.summarize_run(tmp_path / "lambda_unif=0.001")
    assert row["lambda_unif"] == 0.001 and row["train_loss"] == 0.62 and row["linprobe_acc1"] is None


def test_sweep_cli_sorted_by_lambda(tmp_path, capsys):
    make_sweep(tmp_path / "job")
    out = tmp_path / "out"
    cli(["sweep", "--sweep_dir", str(tmp_path / "job"), "--output_dir", str(out)])
    rows = list(csv.DictReader(open(out / "sweep.csv")))
    assert [r["run"] for r in rows] == ["lambda_unif=0", "lambda_unif=0.001", "lambda_unif=0.01"]
    assert [r["lambda_unif"] for r in rows] == ["0.0", "0.001", "0.01"]
    assert rows[2]["effective_rank_mean"] == "20.0" and rows[1]["effective_rank_mean"] == ""
    assert rows[0]["online_probe_unmasked_acc1"] == "25.0"
    md = (out / "sweep.md").read_text().splitlines()
    assert md[0].startswith("| run | lambda_unif |") and md[4].startswith("| lambda_unif=0.01 |")
    assert "lambda_unif=0.01" in capsys.readouterr().out
    assert Image.open(out / "sweep.png").size == (1200, 400)
    # The same runs given one by one give the same table.
    cli(["sweep", "--runs", *(str(tmp_path / "job" / n) for n in ("lambda_unif=0.01", "lambda_unif=0")),
         "--output_dir", str(tmp_path / "out2")])
    rows2 = list(csv.DictReader(open(tmp_path / "out2" / "sweep.csv")))
    assert [r["run"] for r in rows2] == ["lambda_unif=0", "lambda_unif=0.01"]


def make_term_sweep(root):
    """The launcher's `--sweep lambda_unif=0,0.01 --sweep reg=square,TCR` folders, with and without
    args.json, and an M-MAE run with mu 3 named by `uniformity_lamda`."""
    runs = {
        "lambda_unif=0,reg=square": ({"lambda_unif": 0.0, "reg": "square"}, {"train_loss_mae": 0.6}),
        "lambda_unif=0.01,reg=square": ({"lambda_unif": 0.01, "reg": "spectral"}, {"train_loss_unif": 0.3}),
        "lambda_unif=0.01,reg=TCR": ({"lambda_unif": 0.01, "reg": "TCR", "uniformity_mu": 1.0, "centering": True},
                                     {"train_loss_tcr": -20.0}),
        "lambda_unif=0.01,reg=TCR,uniformity_lamda=3": (None, {"train_loss_tcr": -35.0}),
        "mae": ({"lambda_unif": 0.0}, {"train_loss_mae": 0.61}),
    }
    for name, (stored, line) in runs.items():
        write_lines(root / name / "log.txt", [{"epoch": 0, "train_loss": 0.5, "effective_rank_mean": 3.0, **line}])
        if stored is not None:
            (root / name / "args.json").write_text(json.dumps(stored))


def test_sweep_reads_the_term_from_args_or_folder_name(tmp_path):
    make_term_sweep(tmp_path)
    row = sweep.summarize_run(tmp_path / "lambda_unif=0.01,reg=TCR,uniformity_lamda=3")  # the name only
    assert (row["lambda_unif"], row["reg"], row["uniformity_mu"], row["centering"]) == (0.01, "TCR", 3.0, False)
    assert row["train_loss_tcr"] == -35.0 and row["train_loss_unif"] is None
    row = sweep.summarize_run(tmp_path / "lambda_unif=0.01,reg=TCR")
    assert (row["reg"], row["uniformity_mu"], row["centering"]) == ("TCR", 1.0, True)
    row = sweep.summarize_run(tmp_path / "lambda_unif=0.01,reg=square")  # args.json wins; spectral means square
    assert (row["reg"], row["uniformity_mu"], row["centering"]) == ("square", None, None)
    assert sweep.summarize_run(tmp_path / "mae")["reg"] == "none"  # lambda 0 and no term named: plain MAE


def test_sweep_cli_orders_terms_and_plots_one_series_each(tmp_path):
    make_term_sweep(tmp_path / "job")
    out = tmp_path / "out"
    cli(["sweep", "--sweep_dir", str(tmp_path / "job"), "--output_dir", str(out)])
    rows = list(csv.DictReader(open(out / "sweep.csv")))
    assert [(r["lambda_unif"], r["reg"], r["uniformity_mu"]) for r in rows] == [
        ("0.0", "none", ""), ("0.0", "square", ""), ("0.01", "square", ""), ("0.01", "TCR", "1.0"),
        ("0.01", "TCR", "3.0")]
    assert rows[4]["train_loss_tcr"] == "-35.0" and rows[3]["centering"] == "True"
    assert "| run | lambda_unif | reg | uniformity_mu |" in (out / "sweep.md").read_text()
    assert Image.open(out / "sweep.png").size == (1200, 400)
    labels = {sweep.term_label(sweep.summarize_run(p)) for p in sweep.find_runs(tmp_path / "job")}
    assert labels == {"none", "square", "TCR mu=1 centred", "TCR mu=3"}
