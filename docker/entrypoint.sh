#!/bin/sh
# Entrypoint of the nnunet-rndpo image (see docker/README.md).
#
# What it does before handing over to the requested command:
#   1. refuses anything but the nnU-Net / nnunet_rndpo commands (and python / a shell for debugging), so
#      that a typo or a wrong argument order fails loudly instead of running something unexpected;
#   2. makes sure nnUNet_extTrainer is set: without it `nnUNetv2_train ... -tr nnUNetTrainerRNDPO` cannot
#      find our trainers (nnU-Net has no plugin registry; it only scans the folders in this variable);
#   3. warns when /dev/shm is small: nnU-Net's data-augmentation workers pass batches through shared
#      memory and die ("background workers died", bus errors) with Docker's default of 64 MB;
#   4. warns when the preprocessed/results folders are not writable by the user the container runs as;
#   5. points HOME at a writable folder when the container runs under an arbitrary `--user` uid (Docker
#      then sets HOME=/), because matplotlib, torch.compile/triton and friends write caches under it;
#   6. sets nnUNet_compile=false when it is unset and the image has no C compiler (see ensure_compile_setting);
#   7. stays PID 1 and passes `docker stop` on to the command (see run_passing_stop_signals_on).
#
# Written for POSIX sh (dash in the image) and also runs under bash.
#
# Settings read from the environment (all optional):
#   RNDPO_ENTRYPOINT_DRY_RUN=1  print the environment it settled on, the command it would run and how
#                               (`exec` or `child`), then exit 0 without running it (used by
#                               tests/test_docker_entrypoint.py; handy to debug)
#   RNDPO_SHM_PATH              shared-memory folder to check (default /dev/shm)
#   RNDPO_SHM_SIZE_KB           pretend the shared memory has this size in KiB (tests; skips `df`)
set -eu

# Below this size (KiB) /dev/shm is too small for nnU-Net's augmentation workers: 1 GiB.
SHM_MIN_KB=1048576

log() {
    printf 'nnunet-rndpo entrypoint: %s\n' "$*" >&2
}

usage() {
    cat <<'EOF'
nnunet-rndpo: nnU-Net v2 with preference fine-tuning (RN-DPO)

Usage: docker run [docker options] nnunet-rndpo COMMAND [ARGS...]

Allowed commands:
  nnUNetv2_*        any nnU-Net v2 command, e.g.
                      nnUNetv2_plan_and_preprocess -d 4 --verify_dataset_integrity
                      nnUNetv2_train 4 3d_fullres 0 -tr nnUNetTrainerRNDPO
                      nnUNetv2_predict -i IN -o OUT -d 4 -c 3d_fullres -tr nnUNetTrainerRNDPO
  nnunet_rndpo      this package's command line, e.g. `nnunet_rndpo --help`, `nnunet_rndpo demo`
  python, python3   a Python interpreter (debugging)
  bash, sh          a shell (debugging)

Data folders (mount host folders there):
  nnUNet_raw=/data/nnUNet_raw  nnUNet_preprocessed=/data/nnUNet_preprocessed
  nnUNet_results=/data/nnUNet_results

Recommended docker options:
  --gpus all                    use the GPUs
  --shm-size=8g  (or --ipc=host)  nnU-Net's augmentation workers need shared memory
  --user "$(id -u):$(id -g)"    files written to mounted folders belong to you
EOF
}

# Prints ARGS as one line that a POSIX shell would split back into the same words.
quote_words() {
    out=""
    for word in "$@"; do
        case $word in
            '' | *[!A-Za-z0-9_./=:@%+,-]*)
                # Single-quote it; an embedded ' becomes '\'' .
                word="'$(printf '%s' "$word" | sed "s/'/'\\\\''/g")'"
                ;;
        esac
        out="${out:+$out }$word"
    done
    printf '%s\n' "$out"
}

# Strips one pair of matching surrounding quotes (what shlex.quote or a hand-written export adds).
unquote() {
    value=$1
    case $value in
        \'*\') value=${value#\'}; value=${value%\'} ;;
        \"*\") value=${value#\"}; value=${value%\"} ;;
    esac
    printf '%s\n' "$value"
}

# Prints the trainers folder of the installed package, or nothing. The package's own `nnunet_rndpo env`
# is asked first (one source of truth for the export line); importing the package is the fallback for
# when the console script is missing or fails.
derive_ext_trainer() {
    if command -v nnunet_rndpo >/dev/null 2>&1; then
        if env_out=$(nnunet_rndpo env 2>/dev/null); then
            line=$(printf '%s\n' "$env_out" | sed -n 's/^[[:space:]]*export[[:space:]]\{1,\}nnUNet_extTrainer=//p' | head -n 1)
            value=$(unquote "$line")
            # Only a plain path is taken; anything that still needs a shell to expand is not.
            case $value in
                '' | *'$'* | *'`'*) ;;
                *) printf '%s\n' "$value"; return 0 ;;
            esac
        fi
    fi
    for py in python python3; do
        if command -v "$py" >/dev/null 2>&1; then
            if value=$("$py" -c 'import nnunet_rndpo.trainers as t; print(list(t.__path__)[0])' 2>/dev/null) \
                && [ -n "$value" ]; then
                printf '%s\n' "$value"
                return 0
            fi
        fi
    done
    return 0
}

ensure_ext_trainer() {
    if [ -n "${nnUNet_extTrainer:-}" ]; then
        # Set (the image's ENV does): only check that every listed folder exists.
        rest=$nnUNet_extTrainer
        while [ -n "$rest" ]; do
            entry=${rest%%:*}
            case $rest in *:*) rest=${rest#*:} ;; *) rest="" ;; esac
            if [ -n "$entry" ] && [ ! -d "$entry" ]; then
                log "warning: nnUNet_extTrainer lists '$entry', which is not a folder; nnU-Net will not find the nnunet_rndpo trainers there."
            fi
        done
        return 0
    fi
    value=$(derive_ext_trainer)
    if [ -n "$value" ]; then
        nnUNet_extTrainer=$value
        export nnUNet_extTrainer
        log "nnUNet_extTrainer was not set; using $value"
    else
        log "warning: nnUNet_extTrainer is not set and could not be derived (is nnunet-rndpo installed?); nnUNetv2_train -tr nnUNetTrainerRNDPO will not find the trainer."
    fi
}

check_shm() {
    shm_path=${RNDPO_SHM_PATH:-/dev/shm}
    if [ -n "${RNDPO_SHM_SIZE_KB:-}" ]; then
        size_kb=$RNDPO_SHM_SIZE_KB
    elif [ -d "$shm_path" ]; then
        size_kb=$(df -Pk "$shm_path" 2>/dev/null | awk 'NR == 2 { print $2 }') || size_kb=""
    else
        log "warning: $shm_path does not exist; nnU-Net's data-augmentation workers need shared memory. Run the container with --shm-size=8g (or --ipc=host)."
        return 0
    fi
    case $size_kb in
        '' | *[!0-9]*)
            log "note: could not determine the size of $shm_path."
            return 0
            ;;
    esac
    if [ "$size_kb" -lt "$SHM_MIN_KB" ]; then
        log "warning: $shm_path is only $((size_kb / 1024)) MiB. nnU-Net's data-augmentation workers pass batches through shared memory and die with 'background workers died' or bus errors when it runs out. Run the container with --shm-size=8g (or --ipc=host)."
    fi
}

# Raw data may well be mounted read-only (:ro); preprocessing and training must be able to write.
check_writable() {
    for var in nnUNet_preprocessed nnUNet_results; do
        eval "folder=\${$var:-}"
        if [ -n "$folder" ] && [ -d "$folder" ] && [ ! -w "$folder" ]; then
            log "warning: $var=$folder is not writable by uid $(id -u); mount a host folder you own there and run with --user \"\$(id -u):\$(id -g)\"."
        fi
    done
}

# Docker sets HOME=/ for a uid without a passwd entry (`--user 1234:1234`); caches need a writable HOME.
ensure_home() {
    if [ -z "${HOME:-}" ] || [ ! -d "$HOME" ] || [ ! -w "$HOME" ]; then
        new_home="${TMPDIR:-/tmp}/rndpo-home-$(id -u)"
        if mkdir -p "$new_home" 2>/dev/null && [ -w "$new_home" ]; then
            HOME=$new_home
            export HOME
        else
            # Not fatal: most commands never touch HOME.
            log "warning: HOME=${HOME:-<unset>} is not writable and $new_home could not be created."
        fi
    fi
}

# nnUNetv2_train compiles the network with torch.compile on a GPU unless nnUNet_compile says otherwise, and
# the Triton kernels that torch.compile makes need a C compiler at run time (to build their launchers).
# The pytorch/pytorch *runtime* images have none, so training would stop at its first step with "Failed to
# find C compiler". Without one, compile is turned off here; a user's own setting is kept either way.
ensure_compile_setting() {
    if [ -n "${nnUNet_compile:-}" ] || [ -n "${CC:-}" ]; then
        return 0
    fi
    for compiler in cc gcc clang; do
        if command -v "$compiler" >/dev/null 2>&1; then
            return 0
        fi
    done
    nnUNet_compile=false
    export nnUNet_compile
    case $1 in
        nnUNetv2_train)
            log "note: no C compiler in the image, which torch.compile needs on a GPU: nnUNet_compile=false (docker/README.md, 'torch.compile')."
            ;;
    esac
}

# Runs the command as a child in a session of its own and passes SIGTERM and SIGINT on to that whole session
# as SIGINT; exits with the command's status (130 after an interrupt).
# Why not `exec`: docker stop sends SIGTERM to PID 1, and the kernel delivers to the PID 1 of a container
# only the signals it installed a handler for. Python installs none for SIGTERM, so an exec'd
# nnUNetv2_train would ignore docker stop and be killed (SIGKILL, exit 137) when its grace period ends,
# perhaps in the middle of writing a checkpoint. Why SIGINT: Python turns it into KeyboardInterrupt, so
# `finally` blocks and context managers run (the package's atomic writers remove their temporary files)
# and nnunet_rndpo exits 130; SIGTERM would end Python at once. Why the whole session: every process of
# the run stops, the DDP ranks of a multi-GPU training and nnU-Net's augmentation workers included.
# A shell starts a background command with SIGINT and SIGQUIT ignored, and Python then leaves SIGINT
# ignored too: `env --default-signal` (GNU coreutils 8.31 or later) gives them back their default.
run_passing_stop_signals_on() {
    if env --default-signal=INT,QUIT true 2>/dev/null; then
        set -- env --default-signal=INT,QUIT "$@"
        stop_with=INT
    else
        log "warning: this env cannot reset signals (--default-signal); docker stop will end the command with SIGTERM, without clean-up."
        stop_with=TERM
    fi
    # A background command gets /dev/null as stdin unless given another: hand it the entrypoint's.
    exec 3<&0
    if command -v setsid >/dev/null 2>&1; then
        # The child is no process-group leader, so setsid makes the new session in place: its pid is the
        # session's (and process group's) id.
        setsid "$@" <&3 3<&- &
        target=-$!
    else
        "$@" <&3 3<&- &
        target=$!
    fi
    child=$!
    exec 3<&-
    trap 'pass_on TERM' TERM
    trap 'pass_on INT' INT
    while :; do
        if wait "$child"; then status=0; else status=$?; fi
        # wait also returns (> 128) when a trapped signal arrives; the command may still be running.
        kill -0 "$child" 2>/dev/null || break
    done
    if [ -n "${stop_signal:-}" ]; then
        log "$command_name exited with status $status after SIG$stop_signal."
    fi
    exit "$status"
}

pass_on() {
    stop_signal=$1
    log "SIG$1 received; passing SIG$stop_with on to $command_name and the processes it started."
    kill -s "$stop_with" -- "$target" 2>/dev/null || true
}

# A shell or an interpreter on a terminal (`docker run -it IMAGE bash`) becomes PID 1 itself: it needs the
# terminal for job control and Ctrl-C. Every other command runs under the entrypoint.
run_mode() {
    case $1 in
        bash | sh | python | python3)
            if [ -t 0 ]; then
                echo exec
                return 0
            fi
            ;;
    esac
    echo child
}

if [ "$#" -eq 0 ]; then
    usage
    exit 0
fi

case $1 in
    -h | --help | help)
        usage
        exit 0
        ;;
    nnUNetv2_* | nnunet_rndpo | python | python3 | bash | sh) ;;
    *)
        log "error: '$1' is not an allowed command."
        log "allowed: nnUNetv2_* (any nnU-Net v2 command), nnunet_rndpo, python, python3, bash, sh."
        log "run the image without arguments for usage."
        exit 2
        ;;
esac

if ! command -v "$1" >/dev/null 2>&1; then
    log "error: command '$1' not found in the image (PATH=$PATH)."
    case $1 in
        nnUNetv2_*) log "the nnU-Net commands are listed by: bash -c 'compgen -c nnUNetv2_ | sort -u'" ;;
    esac
    exit 127
fi

ensure_ext_trainer
ensure_compile_setting "$1"
ensure_home
check_shm
check_writable

mode=$(run_mode "$1")
if [ "${RNDPO_ENTRYPOINT_DRY_RUN:-0}" = 1 ]; then
    printf 'env nnUNet_extTrainer=%s\n' "${nnUNet_extTrainer:-}"
    printf 'env HOME=%s\n' "${HOME:-}"
    printf 'env nnUNet_compile=%s\n' "${nnUNet_compile:-}"
    printf 'mode %s\n' "$mode"
    printf 'command %s\n' "$(quote_words "$@")"
    exit 0
fi

if [ "$mode" = exec ]; then
    exec "$@"
fi
command_name=$1
run_passing_stop_signals_on "$@"
