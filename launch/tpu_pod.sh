#!/usr/bin/env bash
# Train pr1 on a Cloud TPU VM slice (one host or a multi-host pod): create the slice, ship the code
# and an idempotent venv to every worker, start the SAME training command on all workers, follow
# its log, stop it, delete the slice. See usage() below, or run with --help.
#
# Every worker runs `PR1_DISTRIBUTED=1 python -m pr1.train ...` (the variable makes the trainer
# call jax.distributed.initialize(), which finds the other workers through the TPU metadata) with
# the run's workdir on GCS, so checkpoints and metrics outlive the VMs and the same command resumes.
set -euo pipefail

usage() {
  cat <<'EOF'
usage: launch/tpu_pod.sh SUBCOMMAND [args]

Subcommands:
  create            create the TPU VM slice (says so and succeeds if it already exists)
  setup             copy the code to every worker and build the venv there (idempotent)
  train [ARGS...]   start training on every worker, in the background; ARGS are extra
                    pr1.train flags, e.g. --config.rollout.n=16 (forwarded with their quoting)
  logs [--worker N] follow the training log of worker N (default 0); Ctrl-C stops following only
  stop              SIGTERM the trainer on every worker: it finishes the step, saves and exits
  delete            delete the slice (asks first unless PR1_YES=1)

Required variables:
  PR1_TPU_NAME      TPU VM name (all subcommands)
  PR1_TPU_ZONE      zone, e.g. us-east5-a (all subcommands)
  PR1_TPU_TYPE      accelerator type, e.g. v5p-64 or v6e-64 (create)
  PR1_GCS_WORKDIR   gs://bucket/prefix; the run's workdir is $PR1_GCS_WORKDIR/$PR1_RUN (train)
Optional variables:
  PR1_PROJECT       GCP project (default: gcloud's configured project)
  PR1_TPU_RUNTIME   TPU software version (default from PR1_TPU_TYPE: v6e v2-alpha-tpuv6e,
                    v5p v2-alpha-tpuv5, v5litepod v2-alpha-tpuv5-lite, v4 and older
                    tpu-ubuntu2204-base)
  PR1_TPU_SPOT=1    create a Spot slice (--spot)       PR1_TPU_RESERVED=1  use a reservation (--reserved)
  PR1_CONFIG        config file (+ optional :arg), relative to the repository
                    [configs/perception_r1_qwen2_5_vl_7b.py]
  PR1_RUN           run name: workdir $PR1_GCS_WORKDIR/$PR1_RUN and worker log ~/pr1-logs/$PR1_RUN.log
                    [the config file's name without .py]
  PR1_JUDGE_URL     judge base URL, e.g. http://judge-host:30000/v1 (--config.rewards.judge.url);
                    it must be reachable from the workers
  PR1_JUDGE_API_KEY_SECRET  Secret Manager secret holding the judge's API key, or
  PR1_JUDGE_API_KEY_FILE    a file ON EACH WORKER holding it (absolute, or relative to the home dir);
                    the key is read on the worker into PR1_JUDGE_API_KEY_ENV [PR1_JUDGE_API_KEY],
                    the variable the trainer reads (rewards.judge.api_key_env). It never appears on
                    a command line, in gcloud's arguments or in a log. A PR1_JUDGE_API_KEY set on
                    this machine is NOT sent to the workers.
  PR1_YES=1         delete without asking
  PR1_DRY_RUN=1     print the commands (one per line, shell-quoted exactly as they would run)
                    instead of running them; read-only checks (does the slice exist?) are skipped

On the workers: code in ~/pr1 (replaced by each `setup`), venv in ~/pr1-venv (kept; rebuilt only when
requirements.txt changes), logs and pid files in ~/pr1-logs. `setup` ships `git archive HEAD`: commit
what you want to run; uncommitted changes are not copied (a warning says so). The model dir and the
parquet files named by the config must exist at the same paths on every worker.

Example (v5p-64, 8 workers):
  export PR1_TPU_NAME=pr1-v5p PR1_TPU_ZONE=us-east5-a PR1_TPU_TYPE=v5p-64
  export PR1_GCS_WORKDIR=gs://my-bucket/pr1 PR1_JUDGE_URL=http://10.0.0.5:30000/v1
  launch/tpu_pod.sh create && launch/tpu_pod.sh setup
  launch/tpu_pod.sh train --config.model.path=/models/Qwen2.5-VL-7B-Instruct
  launch/tpu_pod.sh logs
EOF
}

die() {
  echo "tpu_pod.sh: $*" >&2
  exit 2
}

is_dry_run() {
  [[ "${PR1_DRY_RUN:-0}" == "1" ]]
}

# One word for a POSIX shell: bare when that is safe, else in single quotes. Used for printing;
# printf %q would do too, but backslashes before every space make the dry run unreadable.
shell_word() {
  if [[ "$1" =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then
    printf '%s' "$1"
  else
    printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}

# Runs a command, or under PR1_DRY_RUN=1 prints it as one shell-quoted line (what the tests parse).
run() {
  if is_dry_run; then
    local word line=""
    for word in "$@"; do
      line+="${line:+ }$(shell_word "${word}")"
    done
    echo "${line}"
  else
    "$@"
  fi
}

subcommand="${1:-}"
case "${subcommand}" in
  -h|--help|help) usage; exit 0 ;;
  "") usage >&2; exit 2 ;;
  create|setup|train|logs|stop|delete) shift ;;
  *) echo "tpu_pod.sh: unknown subcommand '${subcommand}'" >&2; usage >&2; exit 2 ;;
esac

# Checked up front, before any gcloud call, so a missing variable costs nothing.
name="${PR1_TPU_NAME:?set PR1_TPU_NAME to the TPU VM name (see launch/tpu_pod.sh --help)}"
zone="${PR1_TPU_ZONE:?set PR1_TPU_ZONE to the zone of the TPU VM, e.g. us-east5-a}"
if [[ "${subcommand}" == "create" ]]; then
  accelerator="${PR1_TPU_TYPE:?set PR1_TPU_TYPE to the accelerator type, e.g. v5p-64}"
fi
if [[ "${subcommand}" == "train" ]]; then
  gcs_workdir="${PR1_GCS_WORKDIR:?set PR1_GCS_WORKDIR to a gs://bucket/prefix for checkpoints and metrics}"
  if [[ "${gcs_workdir}" != gs://?* ]]; then
    die "PR1_GCS_WORKDIR must start with gs:// (got '${gcs_workdir}'): every worker writes the same run directory, so it must be shared storage"
  fi
  gcs_workdir="${gcs_workdir%/}"
  if [[ -n "${PR1_JUDGE_URL:-}" && ! "${PR1_JUDGE_URL}" =~ ^https?://. ]]; then
    die "PR1_JUDGE_URL must be an http(s):// base URL such as http://judge-host:30000/v1 (got '${PR1_JUDGE_URL}')"
  fi
fi

where=(--zone "${zone}")
if [[ -n "${PR1_PROJECT:-}" ]]; then
  where+=(--project "${PR1_PROJECT}")
fi
tpu_vm=(gcloud compute tpus tpu-vm)

config="${PR1_CONFIG:-configs/perception_r1_qwen2_5_vl_7b.py}"
run_name="${PR1_RUN:-$(basename "${config%%:*}" .py)}"
if [[ ! "${run_name}" =~ ^[A-Za-z0-9._-]+$ ]]; then
  die "PR1_RUN must be letters, digits, '.', '_' or '-' (got '${run_name}'): it names a GCS prefix and a log file"
fi
# Remote paths: $HOME is expanded by the worker's shell, not here.
# shellcheck disable=SC2016  # deliberately unexpanded here
remote_code='"$HOME/pr1"'
# shellcheck disable=SC2016
remote_venv='"$HOME/pr1-venv"'
log_file="\"\$HOME/pr1-logs/${run_name}.log\""
pid_file="\"\$HOME/pr1-logs/${run_name}.pid\""
# Worker shell function: the pid of this run's live trainer, or failure. The cmdline check keeps a
# pid reused after a reboot from passing for the trainer (and from being sent `stop`'s SIGTERM).
live_pid_fn="pr1_live_pid() { p=\"\$(cat ${pid_file} 2>/dev/null)\" && [ -n \"\$p\" ] && "
live_pid_fn+="grep -qa pr1.train \"/proc/\$p/cmdline\" 2>/dev/null && echo \"\$p\"; }; "

default_runtime() {
  case "$1" in
    v6e-*) echo "v2-alpha-tpuv6e" ;;
    v5p-*) echo "v2-alpha-tpuv5" ;;
    v5litepod-*|v5e-*) echo "v2-alpha-tpuv5-lite" ;;
    v2-*|v3-*|v4-*) echo "tpu-ubuntu2204-base" ;;
    *) die "no default TPU software version for PR1_TPU_TYPE='$1'; set PR1_TPU_RUNTIME (gcloud compute tpus tpu-vm versions list --zone ${zone})" ;;
  esac
}

cmd_create() {
  # ${flags[@]+...} below: an empty array is "unbound" under set -u in bash 3.2 (macOS).
  local runtime flags=()
  runtime="${PR1_TPU_RUNTIME:-$(default_runtime "${accelerator}")}"
  if [[ "${PR1_TPU_SPOT:-0}" == "1" && "${PR1_TPU_RESERVED:-0}" == "1" ]]; then
    die "PR1_TPU_SPOT=1 and PR1_TPU_RESERVED=1 exclude each other"
  fi
  if [[ "${PR1_TPU_SPOT:-0}" == "1" ]]; then flags+=(--spot); fi
  if [[ "${PR1_TPU_RESERVED:-0}" == "1" ]]; then flags+=(--reserved); fi
  if ! is_dry_run; then
    local state
    if state="$("${tpu_vm[@]}" describe "${name}" "${where[@]}" --format='value(state)' 2>/dev/null)"; then
      echo "tpu_pod.sh: TPU VM '${name}' already exists in ${zone} (state ${state:-unknown}); not creating it" >&2
      return 0
    fi
  fi
  run "${tpu_vm[@]}" create "${name}" "${where[@]}" --accelerator-type "${accelerator}" \
    --version "${runtime}" ${flags[@]+"${flags[@]}"}
}

cmd_setup() {
  local root tmp tarball commit remote
  root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
  commit="$(git -C "${root}" rev-parse --short HEAD)" || die "${root} is not a git checkout; setup ships 'git archive HEAD'"
  if [[ -n "$(git -C "${root}" status --porcelain --untracked-files=no)" ]]; then
    echo "tpu_pod.sh: warning: uncommitted changes in ${root} are NOT copied (setup ships commit ${commit})" >&2
  fi
  tmp="$(mktemp -d)"
  # shellcheck disable=SC2064  # expand now: tmp is local to this function
  trap "rm -rf '${tmp}'" EXIT
  tarball="${tmp}/pr1-${commit}.tar.gz"
  # git archive rather than the working tree: exactly one commit, no .git, runs/ or workdirs.
  run git -C "${root}" archive --format=tar.gz -o "${tarball}" HEAD
  run "${tpu_vm[@]}" scp "${tarball}" "${name}:pr1.tar.gz" "${where[@]}" --worker=all
  # Unpack into a fresh dir and swap, so files deleted upstream do not linger on the workers.
  remote="rm -rf \"\$HOME/pr1.new\" && mkdir -p \"\$HOME/pr1.new\""
  remote+=" && tar -xzf \"\$HOME/pr1.tar.gz\" -C \"\$HOME/pr1.new\""
  remote+=" && rm -rf ${remote_code} && mv \"\$HOME/pr1.new\" ${remote_code}"
  remote+=" && PR1_VENV=${remote_venv} bash ${remote_code}/launch/bootstrap_venv.sh tpu"
  run "${tpu_vm[@]}" ssh "${name}" "${where[@]}" --worker=all --command "${remote}"
  if ! is_dry_run; then
    echo "tpu_pod.sh: commit ${commit} is on every worker of ${name}; next: launch/tpu_pod.sh train" >&2
  fi
}

# Shell text run on each worker that puts the judge's API key into the trainer's environment.
judge_key_loader() {
  local key_env="${PR1_JUDGE_API_KEY_ENV:-PR1_JUDGE_API_KEY}"
  if [[ ! "${key_env}" =~ ^[A-Za-z_][A-Za-z0-9_]*$ ]]; then
    die "PR1_JUDGE_API_KEY_ENV must be a variable name (got '${key_env}')"
  fi
  if [[ -n "${PR1_JUDGE_API_KEY_SECRET:-}" && -n "${PR1_JUDGE_API_KEY_FILE:-}" ]]; then
    die "set one of PR1_JUDGE_API_KEY_SECRET and PR1_JUDGE_API_KEY_FILE, not both"
  fi
  local source_cmd
  if [[ -n "${PR1_JUDGE_API_KEY_SECRET:-}" ]]; then
    source_cmd="gcloud secrets versions access latest --secret=$(printf '%q' "${PR1_JUDGE_API_KEY_SECRET}")"
  elif [[ -n "${PR1_JUDGE_API_KEY_FILE:-}" ]]; then
    source_cmd="cat -- $(printf '%q' "${PR1_JUDGE_API_KEY_FILE}")"
  else
    if [[ -n "${PR1_JUDGE_API_KEY:-}" ]]; then
      echo "tpu_pod.sh: warning: PR1_JUDGE_API_KEY is set here but is not sent to the workers;" \
        "use PR1_JUDGE_API_KEY_SECRET or PR1_JUDGE_API_KEY_FILE" >&2
    fi
    return 0
  fi
  # A bare assignment returns the status of its command substitution, so a missing file or secret
  # stops the worker here instead of starting a run that fails at the first judge call.
  printf '%s' "${key_env}=\"\$(${source_cmd})\" && [ -n \"\$${key_env}\" ] && export ${key_env} || "
  printf '%s' "{ echo \"pr1: could not read the judge API key on \$(hostname)\" >&2; exit 1; }; "
}

cmd_train() {
  local args key_loader remote
  args=(--config "${config}" --workdir "${gcs_workdir}/${run_name}")
  if [[ -n "${PR1_JUDGE_URL:-}" ]]; then
    args+=("--config.rewards.judge.url=${PR1_JUDGE_URL}")
  fi
  if [[ -n "${PR1_JUDGE_API_KEY_SECRET:-}${PR1_JUDGE_API_KEY_FILE:-}" ]]; then
    args+=("--config.rewards.judge.api_key_env=${PR1_JUDGE_API_KEY_ENV:-PR1_JUDGE_API_KEY}")
  fi
  args+=("$@")
  key_loader="$(judge_key_loader)"
  # One line of worker shell. setsid+nohup with every stream redirected: the trainer survives the
  # ssh session ending, and ssh does not wait for it. A live pid file refuses a second start, which
  # would write the same checkpoints.
  remote="mkdir -p \"\$HOME/pr1-logs\" || exit 1; ${live_pid_fn}"
  remote+="if pid=\"\$(pr1_live_pid)\"; then "
  remote+="echo \"pr1: run ${run_name} is already running on \$(hostname) (pid \$pid); launch/tpu_pod.sh stop first\" >&2; exit 1; fi; "
  remote+="${key_loader}"
  remote+="cd ${remote_code} || exit 1; "
  remote+="PR1_DISTRIBUTED=1 setsid nohup ${remote_venv}/bin/python -m pr1.train $(printf '%q ' "${args[@]}")"
  remote+="> ${log_file} 2>&1 < /dev/null & "
  remote+="echo \$! > ${pid_file}; echo \"pr1: started ${run_name} on \$(hostname) (pid \$!), log ${log_file//\"/}\""
  run "${tpu_vm[@]}" ssh "${name}" "${where[@]}" --worker=all --command "${remote}"
  if ! is_dry_run; then
    echo "tpu_pod.sh: workdir ${gcs_workdir}/${run_name}; follow with: launch/tpu_pod.sh logs" >&2
  fi
}

cmd_logs() {
  local worker=0
  while [[ $# -gt 0 ]]; do
    case "$1" in
      --worker) worker="${2:-}"; shift 2 || die "--worker needs a number" ;;
      --worker=*) worker="${1#--worker=}"; shift ;;
      *) die "logs: unknown argument '$1' (only --worker N)" ;;
    esac
  done
  if [[ ! "${worker}" =~ ^[0-9]+$ ]]; then
    die "logs: --worker takes a worker index (0, 1, ...), got '${worker}'"
  fi
  run "${tpu_vm[@]}" ssh "${name}" "${where[@]}" "--worker=${worker}" \
    --command "tail -n 200 -F ${log_file}"
}

cmd_stop() {
  local remote
  remote="${live_pid_fn}if pid=\"\$(pr1_live_pid)\"; then "
  remote+="kill -TERM \"\$pid\" && echo \"pr1: stopping ${run_name} on \$(hostname) (pid \$pid)\"; "
  remote+="else echo \"pr1: ${run_name} is not running on \$(hostname)\"; fi"
  run "${tpu_vm[@]}" ssh "${name}" "${where[@]}" --worker=all --command "${remote}"
}

cmd_delete() {
  if ! is_dry_run && [[ "${PR1_YES:-0}" != "1" ]]; then
    if [[ ! -t 0 ]]; then
      die "delete: not a terminal, so cannot ask; set PR1_YES=1 to delete '${name}' without asking"
    fi
    local answer
    read -r -p "Delete TPU VM '${name}' in ${zone}? Files on its disks are lost (the GCS workdir is kept). [y/N] " answer
    if [[ "${answer}" != "y" && "${answer}" != "Y" && "${answer}" != "yes" ]]; then
      echo "tpu_pod.sh: not deleting ${name}" >&2
      return 1
    fi
  fi
  run "${tpu_vm[@]}" delete "${name}" "${where[@]}" --quiet
}

case "${subcommand}" in
  create) cmd_create ;;
  setup) cmd_setup ;;
  train) cmd_train "$@" ;;
  logs) cmd_logs "$@" ;;
  stop) cmd_stop ;;
  delete) cmd_delete ;;
esac
