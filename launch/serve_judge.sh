#!/usr/bin/env bash
# Serve the perception judge (Qwen2.5-32B-Instruct by default) behind SGLang's OpenAI-compatible
# API, for pr1's OpenAIJudge (rewards.judge.url).
#
#   launch/serve_judge.sh [MODEL_DIR] [extra sglang.launch_server flags...]
#   PR1_JUDGE_TP=4 PR1_JUDGE_PORT=30001 launch/serve_judge.sh /models/Qwen2.5-32B-Instruct-AWQ
#
# Then train with --config.rewards.judge.url=http://<this host>:30000/v1 (the served model name
# defaults to Qwen2.5-32B-Instruct, the config's rewards.judge.model).
#
# MODEL_DIR is a local Hugging Face checkpoint directory (nothing is downloaded here); fetch it
# beforehand, e.g. `huggingface-cli download Qwen/Qwen2.5-32B-Instruct --local-dir DIR`. The paper
# served an AWQ build with tensor parallel 8; an AWQ directory is detected from its config.
#
# Environment (all optional):
#   PR1_JUDGE_MODEL_PATH  model dir when no argument is given (default models/Qwen2.5-32B-Instruct)
#   PR1_JUDGE_NAME        served model name (default Qwen2.5-32B-Instruct)
#   PR1_JUDGE_TP          tensor-parallel size (default: number of visible GPUs)
#   PR1_JUDGE_HOST        bind address (default 127.0.0.1; 0.0.0.0 to serve other hosts)
#   PR1_JUDGE_PORT        port (default 30000)
#   PR1_JUDGE_MAX_RUNNING max concurrent requests the server schedules (default 512, the paper's)
#   PR1_JUDGE_API_KEY     if set, clients must send it (pr1 reads the same variable by default).
#                         It is passed on SGLang's command line, so other users of this machine can
#                         see it in `ps`: use it on single-tenant hosts, or bind to 127.0.0.1.
set -euo pipefail

usage() {
  # The header comment is the usage text.
  awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${BASH_SOURCE[0]}"
}
case "${1:-}" in
  -h|--help) usage; exit 0 ;;
esac

model="${1:-${PR1_JUDGE_MODEL_PATH:-models/Qwen2.5-32B-Instruct}}"
if [[ $# -gt 0 ]]; then shift; fi
name="${PR1_JUDGE_NAME:-Qwen2.5-32B-Instruct}"
host="${PR1_JUDGE_HOST:-127.0.0.1}"
port="${PR1_JUDGE_PORT:-30000}"
max_running="${PR1_JUDGE_MAX_RUNNING:-512}"

if [[ ! -f "${model}/config.json" ]]; then
  echo "serve_judge.sh: no model at '${model}' (expected a Hugging Face checkpoint dir with config.json)." >&2
  echo "  Pass it as the first argument or set PR1_JUDGE_MODEL_PATH, e.g. after" >&2
  echo "  huggingface-cli download Qwen/Qwen2.5-32B-Instruct --local-dir '${model}'" >&2
  exit 2
fi

if [[ -n "${PR1_JUDGE_TP:-}" ]]; then
  tp="${PR1_JUDGE_TP}"
elif command -v nvidia-smi >/dev/null 2>&1; then
  tp="$(nvidia-smi -L | wc -l)"
else
  tp=1
fi
if [[ "${tp}" -lt 1 ]]; then
  echo "serve_judge.sh: no GPU visible; set PR1_JUDGE_TP or CUDA_VISIBLE_DEVICES" >&2
  exit 2
fi

args=(
  --model-path "${model}"
  --served-model-name "${name}"
  --tp "${tp}"
  --host "${host}"
  --port "${port}"
  --max-running-requests "${max_running}"
)
if [[ -n "${PR1_JUDGE_API_KEY:-}" ]]; then
  args+=(--api-key "${PR1_JUDGE_API_KEY}")
fi

echo "serving ${model} as '${name}' on http://${host}:${port}/v1 (tp=${tp})" >&2
exec python -m sglang.launch_server "${args[@]}" "$@"
