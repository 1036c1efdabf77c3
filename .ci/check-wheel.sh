#!/usr/bin/env bash
# CI: build the wheel, install it into a fresh virtualenv and check that the installed command
# starts outside the checkout: `insect-exp --help` and a demo-size training job, both run from a
# temporary directory. Fails if either fails (a wheel without its config, say).
#
# Dependencies: by default the wheel goes in with --no-deps, into a venv that sees the project
# venv's packages through a .pth file. Those are what `pip install -e ".[dev]"` resolved from the
# same metadata a moment before, and `pip check` confirms they satisfy the wheel's requirements;
# the venv does not see the checkout or its editable install. CHECK_WHEEL_FULL=1 installs the
# wheel with its dependencies from the package index instead (about 3 GB installed; 1.5 minutes
# here with a local mirror).
#
# Usage: bash .ci/check-wheel.sh     (with the project's venv active, or PYTHON=/path/to/python)
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

step() { printf '\n== check-wheel: %s\n' "$*"; }

step "build the wheel from a clean copy of the tree"
# Not in place: an in-tree build reuses build/lib, which can still hold modules deleted since.
mkdir "$work/src" "$work/dist" "$work/run"
tar -c --exclude-vcs --exclude=./.venv --exclude=./build --exclude=./dist --exclude='*.egg-info' \
    --exclude=./outputs --exclude=./mlruns --exclude=__pycache__ --exclude=.pytest_cache \
    --exclude=.ruff_cache . | tar -x -C "$work/src"
"$python" -m pip wheel --quiet --no-deps --no-cache-dir -w "$work/dist" "$work/src"
wheel=$(ls "$work"/dist/insect_exp-*.whl)
"$python" - "$wheel" <<'EOF'
import sys
import zipfile

names = set(zipfile.ZipFile(sys.argv[1]).namelist())
needed = {"insect_exp/conf/config.yaml", "insect_exp/conf/hydra/help/insect_exp.yaml",
          "insect_exp/conf/model/cnn.yaml", "insect_exp/conf/dataset/demo.yaml",
          "hydra_plugins/insect_exp_launcher/isolated_joblib.py"}
missing = sorted(needed - names)
if missing:
    sys.exit(f"check-wheel: the wheel lacks {missing}")
print(f"{sys.argv[1].rsplit('/', 1)[-1]}: {len(names)} files, the config included")
EOF

step "install it into a fresh venv"
"$python" -m venv "$work/venv"
venv_python=$work/venv/bin/python
if [ "${CHECK_WHEEL_FULL:-0}" = 1 ]; then
    "$venv_python" -m pip install --quiet "$wheel"
else
    site=$("$venv_python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    "$python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])' > "$site/_project_deps.pth"
    "$venv_python" -m pip install --quiet --no-deps "$wheel"
    "$venv_python" -m pip check
fi

step "run it from a temporary directory"
cd "$work/run"
unset PYTHONPATH MLFLOW_TRACKING_URI
location=$("$venv_python" -c 'import insect_exp; print(insect_exp.__file__)')
case "$location" in
    "$work/venv/"*) echo "insect_exp imported from $location" ;;
    *) echo "check-wheel: insect_exp imported from $location, not from the wheel" >&2; exit 1 ;;
esac
"$work/venv/bin/insect-exp" --help > help.txt 2>&1 || { cat help.txt >&2; exit 1; }
grep -q "== Config groups" help.txt || { cat help.txt >&2; echo "check-wheel: no help" >&2; exit 1; }
echo "insect-exp --help: ok"
INSECT_EXP_CACHE_DIR=$work/data "$venv_python" -m insect_exp experiment=debug \
    model.image_size=[32,32] dataset.train_per_class=8 dataset.test_per_class=4 | tee job.txt
grep -q "^MLflow run id: " job.txt && test -f mlruns/mlflow.db || {
    echo "check-wheel: the job did not log a run under $work/run/mlruns" >&2
    exit 1
}
step "ok"
