#!/usr/bin/env bash
# Train pr1 on ONE GPU with the embedded rollout engine: the quickest real-hardware check of the whole
# loop (rollouts, rewards, update, checkpoints) before a pod run. Wraps
#   python -m pr1.train --config configs/debug.py --workdir runs/debug ...
# with the GPU environment set. See usage() below, or run with --help.
set -euo pipefail

usage() {
  cat <<'EOF'
usage: launch/gpu_debug.sh [EXTRA pr1.train FLAGS...]
  e.g. launch/gpu_debug.sh --config.train.steps=10

Runs python -m pr1.train on one GPU with the embedded rollout engine, from the repository root
(relative paths below are relative to it), in the foreground; Ctrl-C saves and stops, and the same
command resumes.

Environment (defaults in brackets):
  PR1_CONFIG            config file (+ optional :arg) [configs/debug.py]
  PR1_WORKDIR           run directory [runs/<config name>, e.g. runs/debug]
  CUDA_VISIBLE_DEVICES  the GPU to use [0]
  XLA_PYTHON_CLIENT_MEM_FRACTION  if set, JAX preallocates this fraction of GPU memory; otherwise
                        XLA_PYTHON_CLIENT_PREALLOCATE=false (allocate on demand, so a judge or
                        another job can share the GPU)
  PR1_JUDGE_URL         unset: the offline lexical judge (--config.rewards.judge.url=, whatever the
                        config says). Set: that OpenAI-compatible judge, e.g. http://localhost:30000/v1
                        from launch/serve_judge.sh (--config.rewards.judge.url=URL)
  PR1_JUDGE_MODEL       served judge model name (--config.rewards.judge.model) [the config's]
  PR1_JUDGE_API_KEY     the judge's API key, if it wants one; read by the trainer from its
                        environment, never put on the command line (to use another variable, set
                        PR1_JUDGE_API_KEY_ENV to its name)
  PYTHON                interpreter [python3]; e.g. ~/pr1-venv/bin/python from
                        launch/bootstrap_venv.sh cuda12
  PR1_DRY_RUN=1         print the command instead of running it (skips the GPU check)

JAX needs its CUDA build: pip install "jax[cuda12]==<the jax pin in requirements.txt>", or
launch/bootstrap_venv.sh cuda12 for a venv with everything.
EOF
}

die() {
  echo "gpu_debug.sh: $*" >&2
  exit 2
}

if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then
  usage
  exit 0
fi

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "${root}"

python="${PYTHON:-python3}"
config="${PR1_CONFIG:-configs/debug.py}"
config_file="${config%%:*}"
workdir="${PR1_WORKDIR:-runs/$(basename "${config_file}" .py)}"
if [[ ! -f "${config_file}" ]]; then
  die "config file '${config_file}' not found under ${root} (PR1_CONFIG)"
fi

env_vars=("CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0}")
# A fixed 75% preallocation (JAX's default) would leave no room for a judge on the same GPU.
if [[ -n "${XLA_PYTHON_CLIENT_MEM_FRACTION:-}" ]]; then
  env_vars+=("XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION}")
else
  env_vars+=("XLA_PYTHON_CLIENT_PREALLOCATE=false")
fi
# cuda only: if the GPU is unusable JAX fails at start instead of quietly training on the CPU.
env_vars+=("JAX_PLATFORMS=cuda")

train_args=(--config "${config}" --workdir "${workdir}")
if [[ -n "${PR1_JUDGE_URL:-}" ]]; then
  if [[ ! "${PR1_JUDGE_URL}" =~ ^https?://. ]]; then
    die "PR1_JUDGE_URL must be an http(s):// base URL such as http://localhost:30000/v1 (got '${PR1_JUDGE_URL}')"
  fi
  train_args+=("--config.rewards.judge.url=${PR1_JUDGE_URL}")
  if [[ -n "${PR1_JUDGE_MODEL:-}" ]]; then
    train_args+=("--config.rewards.judge.model=${PR1_JUDGE_MODEL}")
  fi
  if [[ -n "${PR1_JUDGE_API_KEY_ENV:-}" ]]; then
    train_args+=("--config.rewards.judge.api_key_env=${PR1_JUDGE_API_KEY_ENV}")
  fi
else
  # An empty URL selects the offline LexicalJudge (pr1/rewards/combine.py, make_judge).
  train_args+=("--config.rewards.judge.url=")
fi
command=(env "${env_vars[@]}" "${python}" -m pr1.train "${train_args[@]}" "$@")

if [[ "${PR1_DRY_RUN:-0}" == "1" ]]; then
  printf '%q ' "${command[@]}"
  echo
  exit 0
fi

# The check runs without JAX_PLATFORMS=cuda: with it, a JAX lacking the CUDA plugin dies with a bare
# AssertionError instead of naming the platforms it has.
check=(env "CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0}" "${python}" -c "import jax; jax.devices('gpu')")
if ! "${check[@]}" >/dev/null 2>&1; then
  jax_pin="$(sed -n 's/^jax==\([^ ;#]*\).*/\1/p' requirements.txt | head -n 1)"
  echo "gpu_debug.sh: JAX (${python}) sees no GPU with CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0}." >&2
  echo "  Check nvidia-smi, then install JAX's CUDA build:" >&2
  echo "    ${python} -m pip install \"jax[cuda12]==${jax_pin:-<the jax pin in requirements.txt>}\"" >&2
  echo "  or build a venv with everything: launch/bootstrap_venv.sh cuda12 (then PYTHON=~/pr1-venv/bin/python)." >&2
  echo "  The error was:" >&2
  "${check[@]}" 2>&1 | tail -n 1 | sed 's/^/    /' >&2 || true
  exit 2
fi

echo "gpu_debug.sh: training in ${workdir} (from ${root})" >&2
exec "${command[@]}"
