#!/usr/bin/env bash
# Start one SGLang rollout server for pr1's GRPO training (rollout.engine=sglang).
#
# Pinned version: SGLang 0.5.5 (pip install "sglang[all]==0.5.5"; it pulls the CUDA stack, so run
# this on a GPU node). pr1.rollout.sglang speaks that version's native API: POST /generate with
# text + image_data data URIs, return_logprob and output_ids in the response; weight_version in
# meta_info; POST /pause_generation, /update_weights_from_disk {model_path, weight_version},
# GET /get_weight_version, POST /continue_generation. Newer versions add fields and keep these.
# No extra flag is needed for the weight updates from disk or for token ids in responses (output_ids
# is returned by default since 0.4.4). Do NOT add --skip-tokenizer-init: pr1 sends text and reads
# the decoded text back.
#
# Usage:
#   launch/serve_rollout.sh CHECKPOINT_DIR [extra sglang.launch_server flags...]
# Environment (defaults in brackets):
#   PR1_ROLLOUT_MODEL  checkpoint dir when no argument is given (an HF Qwen2.5-VL dir, e.g.
#                      Qwen2.5-VL-7B-Instruct or the output of python -m pr1.export)
#   HOST [0.0.0.0]  PORT [30000]  TP [1]  MEM_FRACTION [0.85]  DTYPE [bfloat16]  SEED [0]
#   PYTHON [python3]
# The trainer writes every new policy to <workdir>/weights/step-N/ and asks the server to load it,
# so the server must see the trainer's workdir at the same path (same node or a shared filesystem).
# For several servers, run this once per GPU group with different PORTs (or hosts) and pass all URLs:
#   --config.rollout.sglang.urls='("http://node1:30000", "http://node2:30000")'
set -euo pipefail

usage() {
  # The header comment is the usage text.
  awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${BASH_SOURCE[0]}"
}
case "${1:-}" in
  -h|--help) usage; exit 0 ;;
esac

MODEL="${1:-${PR1_ROLLOUT_MODEL:-}}"
if [[ -z "${MODEL}" ]]; then
  echo "usage: $0 CHECKPOINT_DIR [extra sglang flags]   (or set PR1_ROLLOUT_MODEL)" >&2
  exit 2
fi
if [[ $# -gt 0 ]]; then
  shift
fi
if [[ ! -f "${MODEL}/config.json" ]]; then
  echo "error: ${MODEL}/config.json not found; pass a local Hugging Face checkpoint dir" >&2
  exit 2
fi

HOST="${HOST:-0.0.0.0}"
PORT="${PORT:-30000}"
TP="${TP:-1}"
MEM_FRACTION="${MEM_FRACTION:-0.85}"
DTYPE="${DTYPE:-bfloat16}"
SEED="${SEED:-0}"
PYTHON="${PYTHON:-python3}"

WANT_VERSION="0.5.5"
HAVE_VERSION="$("${PYTHON}" -c 'import sglang; print(sglang.__version__)' 2>/dev/null || true)"
if [[ -z "${HAVE_VERSION}" ]]; then
  echo "error: sglang is not importable by ${PYTHON}; pip install \"sglang[all]==${WANT_VERSION}\"" >&2
  exit 2
fi
if [[ "${HAVE_VERSION}" != "${WANT_VERSION}" ]]; then
  echo "warning: sglang ${HAVE_VERSION} is installed; pr1 is tested against ${WANT_VERSION}" >&2
fi

# Logprobs after temperature, before top-k/top-p: what the learner recomputes (True would return
# the logprobs of the raw logits instead).
export SGLANG_RETURN_ORIGINAL_LOGPROB=false

ADVERTISED_HOST="${HOST}"
if [[ "${ADVERTISED_HOST}" == "0.0.0.0" ]]; then
  ADVERTISED_HOST="$(hostname -f 2>/dev/null || hostname)"
fi
URL="http://${ADVERTISED_HOST}:${PORT}"
echo "starting SGLang ${HAVE_VERSION} on ${MODEL} (tp=${TP}, mem fraction ${MEM_FRACTION})"
echo "when it logs 'The server is fired up', train with:"
echo "  --config.rollout.sglang.urls='(\"${URL}\",)'"

exec "${PYTHON}" -m sglang.launch_server \
  --model-path "${MODEL}" \
  --host "${HOST}" \
  --port "${PORT}" \
  --tp-size "${TP}" \
  --mem-fraction-static "${MEM_FRACTION}" \
  --dtype "${DTYPE}" \
  --random-seed "${SEED}" \
  --enable-multimodal \
  "$@"
