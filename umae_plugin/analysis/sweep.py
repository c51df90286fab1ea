"""Summary of a lambda sweep (paper Table 3), or of a sweep over the uniformity family's term
(`--sweep reg=square,TCR`, `--sweep uniformity_mu=1,3`): one row per pre-training run, sorted by
lambda, then term, then mu.

    python -m umae_plugin.analysis sweep --sweep_dir jobs/lambda_sweep --output_dir out/sweep
    python -m umae_plugin.analysis sweep --runs jobs/lambda_unif=0 jobs/lambda_unif=0.01

A run is an output folder of `main_pretrain.py`. From it:
* `lambda_unif`, the term `reg` (`square`: U-MAE's, `TCR`: M-MAE's coding rate, `none`: lambda 0
  without a term named; the U-MAE reference's `spectral` / `entropy` read as `square`),
  `uniformity_mu` and `centering` (TCR only), and `model`, `epochs`, from `args.json`; without
  it, from the folder name as the launcher's `--sweep` writes it (`lambda_unif=0.01,reg=TCR`;
  also `lambda=` / `lamb=`, `uniformity_lamda=`);
* from `log.txt` (JSON lines): `epoch` of the last line, and for each of `train_loss`,
  `train_loss_mae`, `train_loss_unif`, `train_loss_tcr`, `effective_rank_{mean,cls}` (uncentred, as the paper),
  `effective_rank_centered_{mean,cls}`, `online_probe_masked_acc1` (masked val views, as the
  probe is trained) and `online_probe_unmasked_acc1` the value of the LAST line that has the key
  (the effective rank and the probe are not measured every epoch);
* the linear-probe top-1 accuracy, first found of: `linprobe.json` in the run folder,
  `linprobe/linprobe.json` (key `acc1`, else `test_acc1`), `linprobe/log.txt` (`test_acc1` of
  the last line that has it, as `main_linprobe.py` logs it).
Accuracies in the table are percentages: `online_probe_*_acc1` in the pre-training log and `acc1`
in a `linprobe.json` are fractions (this project's convention for returned values) and are
multiplied by 100; `test_acc1` is a percentage already (the upstream log format).
`--sweep_dir` takes every folder below it that holds an `args.json` or a `log.txt` (folders named
`linprobe` excluded). Writes `sweep.md`, `sweep.csv`, `sweep.json` and `sweep.png`.
"""
from __future__ import annotations

import argparse
import json
import logging
import re
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from . import report
from ..logger import read_log

log = logging.getLogger("umae")

ERANK_KEYS = ("effective_rank_mean", "effective_rank_cls", "effective_rank_centered_mean", "effective_rank_centered_cls")
PROBE_KEYS = ("online_probe_masked_acc1", "online_probe_unmasked_acc1")  # fractions in the log
LOG_KEYS = ("train_loss", "train_loss_mae", "train_loss_unif", "train_loss_tcr", *ERANK_KEYS, *PROBE_KEYS)
COLUMNS = ("run", "lambda_unif", "reg", "uniformity_mu", "epochs", *LOG_KEYS, "linprobe_acc1")
REG_ORDER = ("none", "square", "TCR")
REG_ALIASES = {"spectral": "square", "entropy": "square"}  # the U-MAE reference's names of its term
_LAMBDA_IN_NAME = re.compile(r"(?:lambda_unif|lambda|lamb)=([-+0-9.eE]+)")
_TERM_IN_NAME = {"reg": re.compile(r"(?<![A-Za-z])reg=([A-Za-z]+)"),
                 "uniformity_mu": re.compile(r"(?:uniformity_mu|uniformity_lamda)=([-+0-9.eE]+)"),
                 "centering": re.compile(r"(?<![A-Za-z])centering=([A-Za-z0-9]+)")}
_TRUE = ("true", "1", "yes", "on")


def last_values(rows: Sequence[dict[str, Any]], keys: Sequence[str]) -> dict[str, Any]:
    """For each key, its value on the last row that has it (None if no row has it)."""
    found: dict[str, Any] = {k: None for k in keys}
    for row in rows:
        for k in keys:
            if row.get(k) is not None:
                found[k] = row[k]
    return found


def linprobe_acc1(run: Path) -> tuple[float | None, str | None]:
    """(top-1 accuracy in %, the file it came from) of the run's linear probe, if one is found."""
    for path in (run / "linprobe.json", run / "linprobe" / "linprobe.json"):
        if path.is_file():
            try:
                obj = json.loads(path.read_text())
            except json.JSONDecodeError:
                log.warning("unreadable %s", path)
                continue
            for key, scale in (("acc1", 100.0), ("test_acc1", 1.0)):
                if isinstance(obj, dict) and obj.get(key) is not None:
                    return float(obj[key]) * scale, str(path)
    path = run / "linprobe" / "log.txt"
    if path.is_file():
        value = last_values(read_log(path), ["test_acc1"])["test_acc1"]
        if value is not None:
            return float(value), str(path)
    return None, None


def _number(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def run_term(stored: dict[str, Any], name: str, lambda_unif: float | None) -> dict[str, Any]:
    """`reg`, `uniformity_mu`, `centering` of a run, from its stored args, else its folder name.
    An unnamed term is U-MAE's `square` when lambda > 0 and `none` at lambda 0 (None when lambda
    is unknown); `uniformity_mu` (default 1) and `centering` (default False) belong to TCR and are
    None for the other terms."""
    raw: dict[str, Any] = {}
    for key, pattern in _TERM_IN_NAME.items():
        raw[key] = stored.get(key)
        if raw[key] is None:
            m = pattern.search(name)
            raw[key] = m.group(1) if m else None
    reg = REG_ALIASES.get(raw["reg"], raw["reg"])
    if reg is None and lambda_unif is not None:
        reg = "square" if lambda_unif > 0 else "none"
    if reg != "TCR":
        return {"reg": reg, "uniformity_mu": None, "centering": None}
    mu = _number(raw["uniformity_mu"]) if raw["uniformity_mu"] is not None else 1.0
    centering = raw["centering"]
    if not isinstance(centering, bool):
        centering = str(centering).lower() in _TRUE if centering is not None else False
    return {"reg": reg, "uniformity_mu": mu, "centering": centering}


def summarize_run(run: str | Path) -> dict[str, Any]:
    """One row of the table for output folder `run`."""
    run = Path(run)
    row: dict[str, Any] = {"run": run.name, "path": str(run), "lambda_unif": None, "model": None, "epochs": None}
    args_path = run / "args.json"
    stored: dict[str, Any] = {}
    if args_path.is_file():
        stored = json.loads(args_path.read_text())
        row["model"] = stored.get("model")
        if stored.get("lambda_unif") is not None:
            row["lambda_unif"] = float(stored["lambda_unif"])
    if row["lambda_unif"] is None:
        m = _LAMBDA_IN_NAME.search(run.name)
        if m:
            try:
                row["lambda_unif"] = float(m.group(1))
            except ValueError:
                pass
    row.update(run_term(stored, run.name, row["lambda_unif"]))
    rows = read_log(run / "log.txt") if (run / "log.txt").is_file() else []
    epochs = [int(r["epoch"]) for r in rows if "epoch" in r]
    row["epochs"] = max(epochs) + 1 if epochs else None
    row.update(last_values(rows, LOG_KEYS))
    for key in PROBE_KEYS:
        if row[key] is not None:
            row[key] = float(row[key]) * 100.0
    row["linprobe_acc1"], row["linprobe_source"] = linprobe_acc1(run)
    if not rows:
        log.warning("%s: no log.txt lines", run)
    return row


def find_runs(sweep_dir: str | Path) -> list[Path]:
    """Folders below `sweep_dir` (itself included) that hold an args.json or a log.txt, except
    linear-probe folders."""
    sweep_dir = Path(sweep_dir)
    found = {p.parent for name in ("args.json", "log.txt") for p in sweep_dir.rglob(name)}
    return sorted(d for d in found if "linprobe" not in d.relative_to(sweep_dir).parts)


def sort_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """By lambda ascending (runs without a lambda last), then term (none, square, TCR, others),
    then mu, then by name."""
    def key(r: dict[str, Any]) -> tuple:
        reg = r.get("reg")
        return (r["lambda_unif"] is None, r["lambda_unif"] or 0.0,
                REG_ORDER.index(reg) if reg in REG_ORDER else len(REG_ORDER), str(reg),
                r.get("uniformity_mu") or 0.0, r["run"])
    return sorted(rows, key=key)


def term_label(row: dict[str, Any]) -> str:
    """"square", "TCR mu=3", "TCR mu=3 centred": the term a row's run trained with."""
    if row.get("reg") != "TCR":
        return str(row.get("reg"))
    return f"TCR mu={row['uniformity_mu']:g}" + (" centred" if row.get("centering") else "")


def plot_sweep(rows: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """Effective rank, accuracies and losses against lambda; one series per term when the runs
    trained with several (the lambda-0 runs without a named term, plain MAE, join every series)."""
    rows = [r for r in rows if r["lambda_unif"] is not None]
    baseline = [r for r in rows if r.get("reg") in (None, "none")]
    terms = list(dict.fromkeys(term_label(r) for r in rows if r.get("reg") not in (None, "none")))
    series = [("", rows)] if len(terms) <= 1 else [
        (t, sort_rows(baseline + [r for r in rows if r.get("reg") not in (None, "none") and term_label(r) == t]))
        for t in terms]
    fig = report.new_figure(1200, 400)
    lams = np.array([r["lambda_unif"] for r in rows], dtype=float)
    positive = lams[lams > 0]
    panels = (("effective rank", ERANK_KEYS),
              ("top-1 accuracy (%)", (*PROBE_KEYS, "linprobe_acc1")),
              ("final training loss", ("train_loss_mae", "train_loss")))
    for k, (ylabel, keys) in enumerate(panels):
        ax = fig.add_subplot(1, 3, k + 1)
        for label, group in series:
            x = np.array([r["lambda_unif"] for r in group], dtype=float)
            for key in keys:
                y = np.array([np.nan if r.get(key) is None else float(r[key]) for r in group])
                ok = np.isfinite(y)
                if ok.any():
                    ax.plot(x[ok], y[ok], marker="o", label=f"{key} [{label}]" if label else key)
        if len(positive):
            ax.set_xscale("symlog", linthresh=float(positive.min()))
        ax.set_xlabel("lambda_unif")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7 if len(series) == 1 else 5)
    fig.suptitle("lambda sweep" + (f" ({', '.join(terms)})" if len(terms) > 1 else ""), fontsize=9)
    fig.tight_layout()
    return report.save_figure(fig, path)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("sweep: table of a lambda sweep", add_help=False)
    parser.add_argument("--runs", nargs="*", default=[], help="pre-training output folders")
    parser.add_argument("--sweep_dir", default=None, help="parent folder: every run below it")
    parser.add_argument("--output_dir", default="analysis_out/sweep")
    return parser


def main(args: argparse.Namespace) -> dict[str, Any]:
    runs = [Path(r) for r in args.runs]
    if args.sweep_dir:
        if not Path(args.sweep_dir).is_dir():
            raise SystemExit(f"error: --sweep_dir {args.sweep_dir} is not a folder")
        runs += find_runs(args.sweep_dir)
    runs = list(dict.fromkeys(r.resolve() for r in runs))
    if not runs:
        raise SystemExit("error: no runs: give --runs folders or a --sweep_dir holding them")
    missing = [str(r) for r in runs if not r.is_dir()]
    if missing:
        raise SystemExit(f"error: not a folder: {', '.join(missing)}")
    rows = sort_rows([summarize_run(r) for r in runs])
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    table = report.markdown_table(rows, COLUMNS)
    (out / "sweep.md").write_text(table + "\naccuracies in %; losses and effective rank from the last line that has them; "
                                  "reg: the term (square: U-MAE's, train_loss_unif; TCR: M-MAE's coding rate, "
                                  "train_loss_tcr, with uniformity_mu)\n")
    report.write_csv(out / "sweep.csv", rows, [*COLUMNS, "centering", "model", "linprobe_source", "path"])
    report.write_json(out / "sweep.json", {"rows": rows})
    plot_sweep(rows, out / "sweep.png")
    print(table, end="")
    print(f"wrote {out}")
    return {"rows": rows}

