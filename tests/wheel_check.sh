#!/usr/bin/env bash
# The package works installed from a wheel, away from the checkout: build a wheel of the repository
# (nothing downloaded), install it over the current environment's umae, and from a folder outside
# the checkout run the installed commands (a 1-epoch CPU pre-training of a micro ViT, every other
# command's --help). The editable install of this checkout is restored on exit, pass or fail.
#
#     bash tests/wheel_check.sh        (.ci/run runs it after the test suite; under a minute)
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
start=$SECONDS

# Built without isolation (nothing downloaded), so this environment's setuptools builds the wheel:
# it needs bdist_wheel, built into setuptools since 70.1 (older ones need the `wheel` package).
python - <<'PY' || exit 1
import importlib.util, sys
try:
    import setuptools
except ImportError:
    sys.exit("wheel check: no setuptools in this environment to build the wheel: pip install 'setuptools>=70.1'")
version = tuple(int(p) for p in setuptools.__version__.split(".")[:2] if p.isdigit())
if version < (70, 1) and importlib.util.find_spec("wheel") is None:
    sys.exit(f"wheel check: setuptools {setuptools.__version__} without the wheel package cannot build a wheel "
             "offline: pip install 'setuptools>=70.1'")
PY
tmp=$(mktemp -d)

restore() {
    status=$?
    echo "wheel check: $( [ $status = 0 ] && echo passed || echo FAILED ) in $((SECONDS - start)) s; restoring the editable install of $repo"
    if ! python -m pip install --quiet --no-deps --no-build-isolation -e "$repo"; then
        echo "wheel check: could not restore the editable install: run pip install --no-deps -e $repo" >&2
        status=1
    fi
    rm -rf "$tmp"
    echo "wheel check: done in $((SECONDS - start)) s"
    exit $status
}
trap restore EXIT

# Build from a copy of the tracked and unignored files, so the checkout gets no build/ folder.
mkdir "$tmp/src" "$tmp/dist" "$tmp/run"
if git -C "$repo" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    # (--ignore-failed-read: a tracked file deleted in the working tree is left out)
    git -C "$repo" ls-files -z --cached --others --exclude-standard \
        | tar -C "$repo" --null --ignore-failed-read -T - -cf - 2>/dev/null | tar -C "$tmp/src" -xf -
else
    cp -r "$repo"/. "$tmp/src"
fi
python -m pip wheel --quiet --no-deps --no-build-isolation -w "$tmp/dist" "$tmp/src"
wheel=$(ls "$tmp"/dist/umae-*.whl)
python -m pip install --quiet --no-deps --force-reinstall "$wheel"
echo "wheel check: built and installed $(basename "$wheel") ($((SECONDS - start)) s)"

cd "$tmp/run"
unset PYTHONPATH
# One interpreter for the checks that need no process of their own (each start imports torch and
# timm, seconds apiece): where umae_plugin comes from, the data, and every console script's --help
# through its installed entry point.
python - <<'PY'
import importlib.metadata as md
import io
import shutil
import sys
from contextlib import redirect_stderr, redirect_stdout

import umae_plugin
from umae_plugin.data import make_synthetic_imagefolder

assert "site-packages" in umae_plugin.__file__, umae_plugin.__file__
try:
    import main_pretrain
except ModuleNotFoundError:
    pass
else:
    sys.exit(f"main_pretrain imported from {main_pretrain.__file__}: the check runs inside a checkout")
print("wheel check: umae_plugin from", umae_plugin.__file__)
make_synthetic_imagefolder("images", num_classes=2, per_class=8)

HELP = {"umae-submit": ["pretrain", "--help"]}
scripts = [ep for ep in md.distribution("umae").entry_points if ep.group == "console_scripts"]
assert len(scripts) == 7, scripts
for ep in scripts:
    assert shutil.which(ep.name), f"{ep.name} is not on PATH"
    fn = ep.load()
    sys.argv = [ep.name, *HELP.get(ep.name, ["--help"])]
    out = io.StringIO()
    try:
        with redirect_stdout(out), redirect_stderr(out):
            fn()
        code = 0
    except SystemExit as exit_:
        code = exit_.code or 0
    assert code == 0 and "usage" in out.getvalue().lower(), f"{' '.join(sys.argv)}: exit {code}\n{out.getvalue()}"
    print(f"wheel check: {' '.join(sys.argv)} ({ep.value}): ok")
PY

# The one real run, through the installed script: a 1-epoch CPU pre-training of a micro ViT.
umae-pretrain --model mae_vit_tiny_patch16 --input_size 32 --patch_size 4 --embed_dim 32 --depth 1 --num_heads 2 \
    --decoder_embed_dim 16 --decoder_depth 1 --decoder_num_heads 2 --epochs 1 --warmup_epochs 0 --batch_size 8 \
    --device cpu --num_workers 0 --erank_freq 0 --dataset imagefolder --data_path images \
    --output_dir out --log_dir "" > pretrain.log 2>&1 || { cat pretrain.log; exit 1; }
test -s out/checkpoint-last.pth || { cat pretrain.log; echo "wheel check: no out/checkpoint-last.pth" >&2; exit 1; }
echo "wheel check: umae-pretrain wrote out/checkpoint-last.pth ($((SECONDS - start)) s)"
