#!/usr/bin/env bash
# Runs the test suite against the lowest version of every dependency that pyproject.toml declares, pinned in
# .ci/lowest-constraints.txt, in a fresh virtual environment whose pip and setuptools are current (so nothing may
# rely on pkg_resources). Both Lightning packages are installed, so the plug-in tests run against each.
# The virtual environment lives in $LNSGD_LOWEST_VENV (default /tmp/lnsgd-lowest-venv) and is recreated each run.
set -euo pipefail
cd "$(dirname "$0")/.."
constraints=.ci/lowest-constraints.txt
venv=${LNSGD_LOWEST_VENV:-/tmp/lnsgd-lowest-venv}

# Each pin must be the `>=` bound pyproject.toml declares, so the bounds cannot drift from what this run tests.
python - "$constraints" <<'PY'
import re, sys, tomllib

def norm(name):
    return re.sub(r"[-_.]+", "-", name).lower()

def release(version):  # 2.5 and 2.5.0 name the same release
    return re.sub(r"(\.0)+$", "", version)

project = tomllib.load(open("pyproject.toml", "rb"))["project"]
declared = list(project["dependencies"])
# The gpu extra (triton) needs CUDA: not installed here. The hf extra (transformers) is test-only: its tests check
# LabelNoise's num_classes lookup and Laziness's fallback, which no declared floor affects: they skip here.
for extra in ("dev", "examples", "lightning"):
    declared += project.get("optional-dependencies", {}).get(extra, [])
floors = {}
for requirement in declared:
    name = norm(re.match(r"[A-Za-z0-9_.-]+", requirement).group())
    floor = re.search(r">=\s*([^,;\s]+)", requirement)
    floors[name] = floor.group(1) if floor else None
pins = {}
for line in open(sys.argv[1]):
    line = line.split("#")[0].strip()
    if line:
        name, version = line.split("==")
        pins[norm(name)] = version.strip()
# torch is pinned to the CPU wheel on local disk, not to its declared floor (see the constraints file).
errors = [f"{name}: pyproject.toml declares no lower bound" for name, floor in floors.items() if floor is None]
errors += [f"{name}: declared in pyproject.toml but not pinned in {sys.argv[1]}"
           for name in floors if name not in pins and name != "torch"]
errors += [f"{name}: pinned in {sys.argv[1]} but not declared in pyproject.toml"
           for name in pins if name not in floors]
errors += [f"{name}=={pin} in {sys.argv[1]}, but pyproject.toml declares {name}>={floors[name]}"
           for name, pin in pins.items() if name != "torch" and floors.get(name) and release(floors[name]) != release(pin)]
if errors:
    sys.exit("lowest-versions check: " + "; ".join(errors))
PY

rm -rf "$venv"
python -m venv --upgrade-deps "$venv"
export PYTHON="$venv/bin/python"
# The build backend's warnings are the main run's too: show pip's output only when the install fails.
log="$venv/install.log"
"$PYTHON" -m pip install -q -c "$constraints" -e '.[dev,examples,lightning]' >"$log" 2>&1 || { cat "$log"; exit 1; }

# A lower bound that imports only with an old setuptools is no lower bound: this environment has no pkg_resources.
"$PYTHON" - "$constraints" <<'PY'
import importlib.metadata, importlib.util, sys

assert importlib.util.find_spec("pkg_resources") is None, "pkg_resources is importable: setuptools is not current"
import lightning.pytorch, pytorch_lightning, lightning_lnsgd  # noqa: E401,F401  each imports without pkg_resources

print("lowest versions installed:")
for line in open(sys.argv[1]):
    name = line.split("#")[0].split("==")[0].strip()
    if name:
        print(f"  {name}=={importlib.metadata.version(name)}")
print(f"  setuptools=={importlib.metadata.version('setuptools')}")
PY

bash .ci/pytest.sh
