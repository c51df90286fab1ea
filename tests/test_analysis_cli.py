"""`python -m umae_plugin.analysis`: the dispatcher and every tool's --help."""
import subprocess
import sys

import pytest

from umae_plugin.analysis import TOOLS
from umae_plugin.analysis.__main__ import main as cli


def test_module_help_lists_tools():
    done = subprocess.run([sys.executable, "-m", "umae_plugin.analysis", "--help"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    for tool in TOOLS:
        assert tool in done.stdout


@pytest.mark.parametrize("tool", list(TOOLS))
def test_tool_help(tool, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli([tool, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert f"python -m umae_plugin.analysis {tool}" in out and "--output_dir" in out


def test_unknown_tool():
    with pytest.raises(SystemExit, match="unknown tool"):
        cli(["nope"])
