"""The package works without the checkout: nothing in `umae_plugin` imports the top-level scripts
or edits `sys.path`, the scripts only re-export the package's objects, and every console script
that setup.py declares resolves to a callable. (tests/wheel_check.sh builds and installs the real
wheel; this needs no build.)"""
import ast
import importlib
import inspect
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import main_finetune
import main_linprobe
import main_pretrain
import submitit_launcher
from umae_plugin import finetune, linprobe, pretrain, slurm

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = {"pretrain": (main_pretrain, pretrain), "linprobe": (main_linprobe, linprobe),
           "finetune": (main_finetune, finetune)}
CONSOLE_SCRIPTS = {"umae-pretrain", "umae-linprobe", "umae-finetune", "umae-submit", "umae-analysis",
                   "umae-quickstart", "umae-export"}


def console_scripts() -> dict[str, str]:
    """setup.py's `console_scripts`, {name: "module:function"}, read without running setup.py."""
    tree = ast.parse((ROOT / "setup.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.keyword) and node.arg == "entry_points":
            entries = ast.literal_eval(node.value)["console_scripts"]
            return dict(tuple(part.strip() for part in e.split("=", 1)) for e in entries)
    raise AssertionError("setup.py declares no entry_points")


def test_the_package_runs_without_the_checkout(tmp_path):
    """A copy of the package alone on the path (no main_*.py beside it): every module imports, and
    the launcher builds each script's parser (which imports the script's module)."""
    site = tmp_path / "site"
    shutil.copytree(ROOT / "umae_plugin", site / "umae_plugin", ignore=shutil.ignore_patterns("__pycache__"))
    code = (
        "import sys\n"
        "import umae_plugin.pretrain, umae_plugin.linprobe, umae_plugin.finetune, umae_plugin.quickstart\n"
        "from umae_plugin import slurm\n"
        f"assert umae_plugin.__file__.startswith({str(site)!r}), umae_plugin.__file__\n"
        "for name in slurm.SCRIPTS:\n"
        "    assert slurm.build_parser(name).get_default('model')\n"
        "    assert slurm.import_script(name) is sys.modules['umae_plugin.' + name]\n"
        "scripts = sorted(m for m in sys.modules if m.startswith('main_') or m == 'submitit_launcher')\n"
        "assert not scripts, scripts\n"
        f"assert {str(ROOT)!r} not in sys.path, sys.path\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(site)  # ahead of any installed copy (editable or not)
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr


def test_no_module_imports_the_scripts_or_edits_sys_path():
    """The lazy imports (inside functions) the subprocess above may not reach."""
    offending = []
    for path in sorted((ROOT / "umae_plugin").rglob("*.py")):
        text = path.read_text()
        if re.search(r"^\s*(import|from)\s+(main_\w+|submitit_launcher)\b", text, re.M) or \
                re.search(r"sys\.path\.(insert|append|extend)|sys\.path\s*=", text):
            offending.append(str(path.relative_to(ROOT)))
    assert offending == []


@pytest.mark.parametrize("script", SCRIPTS)
def test_top_level_scripts_re_export_the_package(script):
    top, package = SCRIPTS[script]
    for name in ("get_args_parser", "check_args", "main", "entry"):
        assert getattr(top, name) is getattr(package, name), name
    assert sorted(top.__all__) == ["check_args", "get_args_parser", "main"]
    assert top.__doc__ and f"main_{script}.py" in top.__doc__  # the usage examples stay


def test_launcher_script_re_exports_the_package():
    assert submitit_launcher.main is slurm.main and submitit_launcher.parse_args is slurm.parse_args


def test_console_scripts_resolve_to_callables():
    scripts = console_scripts()
    assert set(scripts) == CONSOLE_SCRIPTS
    for name, target in scripts.items():
        module, _, attr = target.partition(":")
        fn = importlib.import_module(module)
        for part in attr.split("."):
            fn = getattr(fn, part)
        assert callable(fn), name
        # pip's wrapper calls it with no arguments
        assert all(p.default is not p.empty or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
                   for p in inspect.signature(fn).parameters.values()), name


@pytest.mark.parametrize("script", SCRIPTS)
def test_entry_runs_the_command_line(script, monkeypatch, capsys):
    """`umae-<script> --help`: the entry function parses sys.argv as the script does."""
    monkeypatch.setattr(sys, "argv", [f"umae-{script}", "--help"])
    with pytest.raises(SystemExit) as exit_:
        SCRIPTS[script][1].entry()
    assert exit_.value.code == 0 and "--output_dir" in capsys.readouterr().out


def test_submit_entry_exits_with_the_launchers_status(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["umae-submit", "pretrain", "--help"])
    with pytest.raises(SystemExit) as exit_:
        slurm.entry()
    assert exit_.value.code == 0 and "--job_dir" in capsys.readouterr().out
