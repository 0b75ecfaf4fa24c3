#!/usr/bin/env bash
# Idempotent per-machine setup of pr1's Python environment: a venv with requirements.txt and the
# accelerator build of JAX. tpu_pod.sh runs it on every TPU worker (`setup`); on a GPU box run it
# once by hand before gpu_debug.sh.
#
# Usage (from anywhere; it works on the checkout it lives in):
#   launch/bootstrap_venv.sh [tpu|cuda12|cpu]        (default: tpu)
# Environment (defaults in brackets):
#   PR1_VENV    the venv directory [$HOME/pr1-venv]
#   PR1_PYTHON  the interpreter to build it from [the first of python3.12, python3.11, python3 that
#               is >= 3.11]. TPU VM images ship Python 3.10; when no 3.11+ is found and passwordless
#               sudo works (TPU VMs), python3.11 and python3.11-venv are installed with apt-get.
#
# A marker file in the venv, keyed on the accelerator and the SHA-256 of requirements.txt, makes a
# re-run with unchanged requirements a no-op (seconds, not minutes of pip); a changed
# requirements.txt reinstalls into the same venv.
set -euo pipefail

usage() {
  # The header comment is the usage text.
  awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${BASH_SOURCE[0]}"
}

accel="${1:-tpu}"
case "${accel}" in
  -h|--help) usage; exit 0 ;;
  tpu|cuda12|cpu) ;;
  *) echo "bootstrap_venv.sh: unknown accelerator '${accel}' (tpu, cuda12 or cpu)" >&2; exit 2 ;;
esac

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
requirements="${root}/requirements.txt"
venv="${PR1_VENV:-${HOME}/pr1-venv}"
if [[ ! -f "${requirements}" ]]; then
  echo "bootstrap_venv.sh: ${requirements} not found; run the copy of this script inside a pr1 checkout" >&2
  exit 2
fi

# JAX's accelerator extra must match the jax pin, or pip would move jax off the tested version.
jax_version="$(sed -n 's/^jax==\([^ ;#]*\).*/\1/p' "${requirements}" | head -n 1)"
if [[ -z "${jax_version}" ]]; then
  echo "bootstrap_venv.sh: no 'jax==VERSION' line in ${requirements}" >&2
  exit 2
fi

req_hash="$(sha256sum "${requirements}" | cut -c1-16)"
marker="${venv}/.pr1-bootstrap-${accel}-${req_hash}"
if [[ -f "${marker}" ]]; then
  echo "bootstrap_venv.sh: ${venv} is up to date (${accel}, requirements ${req_hash}) on $(hostname)"
  exit 0
fi

python_ok() {
  "$1" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null
}

pick_python() {
  local candidate
  if [[ -n "${PR1_PYTHON:-}" ]]; then
    echo "${PR1_PYTHON}"
    return
  fi
  for candidate in python3.12 python3.11 python3; do
    if command -v "${candidate}" >/dev/null 2>&1 && python_ok "${candidate}"; then
      echo "${candidate}"
      return
    fi
  done
}

if [[ ! -x "${venv}/bin/python" ]]; then
  python="$(pick_python)"
  if [[ -z "${python}" ]] && command -v apt-get >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    echo "bootstrap_venv.sh: no Python >= 3.11 on $(hostname); installing python3.11 with apt-get" >&2
    sudo -n apt-get update -q
    sudo -n env DEBIAN_FRONTEND=noninteractive apt-get install -y -q python3.11 python3.11-venv
    python="python3.11"
  fi
  if [[ -z "${python}" ]] || ! python_ok "${python}"; then
    echo "bootstrap_venv.sh: pr1 needs Python >= 3.11 and none was found on $(hostname)." >&2
    echo "  Install one (Ubuntu: sudo apt-get install python3.11 python3.11-venv) or set PR1_PYTHON." >&2
    exit 2
  fi
  echo "bootstrap_venv.sh: creating ${venv} with $("${python}" --version 2>&1)"
  "${python}" -m venv "${venv}"
elif ! python_ok "${venv}/bin/python"; then
  echo "bootstrap_venv.sh: ${venv} holds Python < 3.11; delete it (rm -rf '${venv}') and run again" >&2
  exit 2
fi

pip=("${venv}/bin/python" -m pip)
"${pip[@]}" install -q --upgrade pip
"${pip[@]}" install -q -r "${requirements}"
case "${accel}" in
  # libtpu wheels are on PyPI for current JAX; the find-links page also serves older pins.
  tpu) "${pip[@]}" install -q "jax[tpu]==${jax_version}" \
         -f https://storage.googleapis.com/jax-releases/libtpu_releases.html ;;
  cuda12) "${pip[@]}" install -q "jax[cuda12]==${jax_version}" ;;
  cpu) ;;
esac
# Importing does not start a backend, so this is safe on one worker of a multi-host slice while the
# others are still installing.
"${venv}/bin/python" -c 'import jax, flax, optax, orbax.checkpoint, grain; print("jax", jax.__version__)'

rm -f "${venv}"/.pr1-bootstrap-*
touch "${marker}"
echo "bootstrap_venv.sh: ${venv} ready (${accel}, requirements ${req_hash}) on $(hostname)"
