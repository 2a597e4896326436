#!/usr/bin/env bash
# Builds docker/Dockerfile on a Debian base made on this machine and runs the image as a user would
# (issue 31; docker/README.md, "Tested here", has a run's output). No image registry is needed.
#
#   docker/test_image.sh            build (layer cache kept between runs), run every step, print PASS/FAIL
#   docker/test_image.sh --help     this text
#
# Steps: a Docker engine (the reachable one, or a dockerd of its own on a private socket, stopped at the
# end); the base image (mmdebstrap: Debian bookworm with python3 in a virtual environment at /opt/venv and
# this machine's CA bundle, made once and reused); `docker build --network host` on that base; then, with
# host folders mounted on /workspace and on the three nnU-Net folders and `--user UID:GID`:
# `nnunet_rndpo demo --quick`; `nnUNetv2_train ... -tr nnUNetTrainerRNDPO_5epochs` on the demo's dataset
# (a tiny schedule through RNDPO_SETTINGS), stopped with `docker stop` mid-training and resumed with --c;
# `nnUNetv2_predict ... -tr nnUNetTrainerRNDPO` and `-tr nnUNetTrainerRNDPO_5epochs`; the owner of every
# file written. Exit status: 0 when every step passed, 1 when one failed, 2 when something it needs is
# missing (it says what; it installs nothing).
#
# Needs: bash, a Docker engine or root and dockerd (Debian: apt-get install docker.io), mmdebstrap for the
# first run (apt-get install mmdebstrap), network access to Debian's mirror and PyPI (torch from PyPI
# is a CUDA build of about 7 GB in the image).
#
# Settings (environment):
#   RNDPO_DOCKER_STATE  folder for the engine this script starts (images, layer cache; kept between runs
#                       so that a rerun is fast) and for the run's files
#                       (default /var/tmp/nnunet-rndpo-docker)
#   RNDPO_TEST_USER     UID:GID the containers run as (default: yours; as root 4242:4242, a user the
#                       image does not know, so that root's powers cannot hide an ownership problem)
#   DOCKER              the docker client (default /usr/bin/docker when it exists, else docker on PATH)
#   RNDPO_REBUILD_BASE=1  make the base image again even if it exists
set -euo pipefail

usage() { sed -n '2,/^set -euo pipefail$/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; }
case ${1:-} in
    -h | --help) usage; exit 0 ;;
    '') ;;
    *) echo "unknown argument '$1'" >&2; usage >&2; exit 2 ;;
esac

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
STATE=${RNDPO_DOCKER_STATE:-/var/tmp/nnunet-rndpo-docker}
WORK=$STATE/run                                   # this run's host folders and logs, emptied at the start
LOGS=$WORK/logs
IMAGE=nnunet-rndpo:local-test
BASE=nnunet-rndpo-base:bookworm-venv
CA_BUNDLE=/etc/ssl/certs/ca-certificates.crt      # copied into the base image only, never into the repository
CONTAINER_PREFIX=nnunet-rndpo-test
# The demo's dataset and configuration (nnunet_rndpo/demo/run.py) and where nnU-Net puts the trainings.
DATASET_ID=990
DATASET=Dataset990_RNDPODemo
CONFIGURATION=3d_demo
TRAINER=nnUNetTrainerRNDPO_5epochs
# The tiny schedule: long enough to stop the training after its first checkpoint, short enough for minutes.
TINY_SCHEDULE='{"num_epochs": 4, "iterations_per_epoch": 12, "val_iterations_per_epoch": 2}'
STOP_GRACE_S=30                                   # docker stop's wait before SIGKILL

# Run inside the image: torch, nnU-Net, this package, and nnU-Net's look-up of the trainer.
IMPORT_CHECK='import torch, nnunetv2, nnunet_rndpo
from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name as find
import contextlib, io
with contextlib.redirect_stdout(io.StringIO()):
    trainer = find("nnUNetTrainerRNDPO_5epochs")
print("torch", torch.__version__, "CUDA build", torch.version.cuda, "GPU available", torch.cuda.is_available(),
      "| trainer", trainer.__module__ + "." + trainer.__name__)'

if [ -z "${DOCKER:-}" ]; then
    if [ -x /usr/bin/docker ]; then DOCKER=/usr/bin/docker; else DOCKER=$(command -v docker || true); fi
fi

passed=0
failed=0
skipped=0
failures=()
own_dockerd_pid=""
started=$(date +%s)

say() { printf '%s\n' "$*"; }
pass() { passed=$((passed + 1)); say "PASS  $*"; }
fail() {
    failed=$((failed + 1))
    failures+=("${1%%:*}")
    say "FAIL  $*"
}
# Prints the last lines of a log after a failure.
show_tail() { sed 's/^/      | /' "$1" | tail -n "${2:-25}"; }
now() { date +%s; }
missing() {
    say "MISSING  $*"
    exit 2
}
docker_() { "$DOCKER" "$@"; }

cleanup() {
    local status=$?
    if [ -n "$DOCKER" ] && docker_ info >/dev/null 2>&1; then
        local ids
        ids=$(docker_ ps -aq --filter "name=^${CONTAINER_PREFIX}-" 2>/dev/null || true)
        if [ -n "$ids" ]; then
            # shellcheck disable=SC2086
            docker_ rm -f $ids >/dev/null 2>&1 || true
        fi
    fi
    if [ -n "$own_dockerd_pid" ]; then
        kill -TERM "$own_dockerd_pid" 2>/dev/null || true
        for _ in $(seq 60); do
            kill -0 "$own_dockerd_pid" 2>/dev/null || break
            sleep 0.5
        done
        if kill -0 "$own_dockerd_pid" 2>/dev/null; then
            say "warning: the dockerd this script started (pid $own_dockerd_pid) did not stop in 30 s"
        else
            say "stopped the dockerd this script started (pid $own_dockerd_pid)"
        fi
    fi
    exit "$status"
}
trap cleanup EXIT
trap 'say "interrupted"; exit 130' INT TERM

# The whole run is one function, read in full before it starts: editing this file during a run (a rerun
# after a change) cannot derail the run.
main() {
    say "docker/test_image.sh: $(date -u '+%Y-%m-%d %H:%M:%S UTC'); $(nproc) CPUs, $(awk '/MemTotal/ {printf "%.0f GiB", $2 / 1048576}' /proc/meminfo) RAM; $(uname -sr); load average $(cut -d' ' -f1-3 /proc/loadavg)"
    if revision=$(git -C "$REPO" rev-parse --short HEAD 2>/dev/null); then
        git -C "$REPO" status --porcelain 2>/dev/null | grep -q . && revision="$revision, with uncommitted changes"
    else
        revision="not a git checkout"
    fi
    say "repository: $REPO ($revision); the image gets this working tree"

    # ------------------------------------------------------------------------------------------------ engine
    [ -n "$DOCKER" ] || missing "the docker client (Debian: apt-get install docker.io)"
    mkdir -p "$STATE"
    exec 9>"$STATE/lock"
    flock -n 9 || missing "another docker/test_image.sh holds $STATE/lock"

    if docker_ info >/dev/null 2>&1; then
        pass "engine: the reachable one (${DOCKER_HOST:-default socket}), server $(docker_ version -f '{{.Server.Version}}')"
    else
        command -v dockerd >/dev/null || missing "no Docker engine is reachable and dockerd is not installed (Debian: apt-get install docker.io)"
        [ "$(id -u)" = 0 ] || missing "no Docker engine is reachable, and starting dockerd needs root"
        # A daemon of its own: private socket, data and exec roots under $STATE, no iptables or bridge (the
        # build uses the host's network; the containers need none).
        export DOCKER_HOST=unix://$STATE/docker.sock
        mkdir -p "$STATE/data" "$STATE/exec"
        dockerd --host "$DOCKER_HOST" --data-root "$STATE/data" --exec-root "$STATE/exec" \
            --pidfile "$STATE/docker.pid" --iptables=false --ip6tables=false --bridge=none \
            >"$STATE/dockerd.log" 2>&1 9>&- &
        own_dockerd_pid=$!
        for _ in $(seq 120); do
            docker_ info >/dev/null 2>&1 && break
            kill -0 "$own_dockerd_pid" 2>/dev/null || break
            sleep 0.5
        done
        if docker_ info >/dev/null 2>&1; then
            pass "engine: dockerd $(docker_ version -f '{{.Server.Version}}') started on $DOCKER_HOST (pid $own_dockerd_pid, data in $STATE/data)"
        else
            fail "engine: dockerd did not come up; its log:"
            show_tail "$STATE/dockerd.log"
            exit 1
        fi
    fi

    # The run's folders, emptied: a rerun starts from nothing but the images.
    rm -rf "$WORK" || { fail "cleanup: cannot empty $WORK"; exit 1; }
    mkdir -p "$LOGS"

    # ------------------------------------------------------------------------------------------------ base
    [ -r "$CA_BUNDLE" ] || missing "$CA_BUNDLE (the CA bundle pip inside the build needs)"
    ca_sha=$(sha256sum "$CA_BUNDLE" | cut -d' ' -f1)
    base_label=$(docker_ image inspect -f '{{index .Config.Labels "org.nnunet-rndpo.ca-bundle-sha256"}}' "$BASE" 2>/dev/null || true)
    if [ "${RNDPO_REBUILD_BASE:-0}" != 1 ] && [ "$base_label" = "$ca_sha" ]; then
        pass "base: $BASE exists ($(docker_ image inspect -f '{{.Created}}' "$BASE" | cut -c1-19)), reused"
    else
        command -v mmdebstrap >/dev/null || missing "mmdebstrap, to make the base image (Debian: apt-get install mmdebstrap)"
        t0=$(now)
        tarball=$STATE/base.tar
        # Debian's python3 with a virtual environment (pip in a venv, as PEP 668 wants on Debian), and this
        # machine's CA bundle over Debian's, so that pip inside the build trusts what this machine trusts.
        if mmdebstrap --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates \
            --customize-hook="copy-in $CA_BUNDLE /etc/ssl/certs" \
            --customize-hook='chroot "$1" python3 -m venv /opt/venv' \
            --customize-hook='chroot "$1" /opt/venv/bin/python -m pip --version' \
            bookworm "$tarball" >"$LOGS/base.log" 2>&1 &&
            docker_ import \
                --change 'ENV PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
                --change 'ENV LANG=C.UTF-8' \
                --change "LABEL org.nnunet-rndpo.ca-bundle-sha256=$ca_sha" \
                --change 'LABEL org.nnunet-rndpo.made-by=docker/test_image.sh' \
                "$tarball" "$BASE" >>"$LOGS/base.log" 2>&1; then
            pass "base: $BASE made with mmdebstrap in $(($(now) - t0)) s"
        else
            fail "base: mmdebstrap or docker import failed ($LOGS/base.log)"
            show_tail "$LOGS/base.log"
            exit 1
        fi
        rm -f "$tarball"
    fi
    if out=$(docker_ run --rm "$BASE" python -c 'import sys; print(sys.prefix, sys.version.split()[0])' 2>&1); then
        pass "base: python $out"
    else
        fail "base: no python in $BASE: $out"
        exit 1
    fi

    # ------------------------------------------------------------------------------------------------ build
    t0=$(now)
    if docker_ build --network host -f "$REPO/docker/Dockerfile" --build-arg "BASE_IMAGE=$BASE" -t "$IMAGE" "$REPO" \
        >"$LOGS/build.log" 2>&1; then
        build_s=$(($(now) - t0))
        size=$(docker_ image inspect -f '{{.Size}}' "$IMAGE" | awk '{printf "%.2f GB", $1 / 1e9}')
        cached=$(grep -c 'Using cache' "$LOGS/build.log" || true)
        pass "build: $IMAGE in ${build_s} s ($cached steps from the layer cache), $size"
        grep -E '^(python|torch) ' "$LOGS/build.log" | sed 's/^/      /' || true
        # Images of earlier runs, untagged now; the layers the new image shares with them stay.
        docker_ image prune -f >/dev/null 2>&1 || true
    else
        fail "build: docker build failed ($LOGS/build.log)"
        show_tail "$LOGS/build.log" 40
        exit 1
    fi

    # ------------------------------------------------------------------------------------------------ runs
    if [ -n "${RNDPO_TEST_USER:-}" ]; then
        run_user=$RNDPO_TEST_USER
    elif [ "$(id -u)" = 0 ]; then
        run_user=4242:4242
    else
        run_user="$(id -u):$(id -g)"
    fi
    run_uid=${run_user%%:*}
    run_gid=${run_user##*:}

    # The host folders, made before any container starts (Docker would make missing ones, owned by root):
    # /workspace, where the demo writes rndpo_demo/, and the demo's three nnU-Net folders, which the later
    # runs mount on the image's /data/nnUNet_raw, _preprocessed and _results.
    WORKSPACE=$WORK/workspace
    DEMO=$WORKSPACE/rndpo_demo
    mkdir -p "$DEMO/nnUNet_raw" "$DEMO/nnUNet_preprocessed" "$DEMO/nnUNet_results"
    printf '%s\n' "$TINY_SCHEDULE" >"$WORKSPACE/rndpo_tiny_schedule.json"
    if [ "$(id -u)" = 0 ]; then
        chown -R "$run_uid:$run_gid" "$WORKSPACE"
    fi

    # What every run gets, as in docker/README.md: the user, shared memory for nnU-Net's workers, the mounts;
    # worker counts for this machine's CPUs.
    run_options=(
        --user "$run_user" --shm-size=2g
        -e nnUNet_n_proc_DA=2 -e nnUNet_def_n_proc=2
        -v "$WORKSPACE:/workspace"
        -v "$DEMO/nnUNet_raw:/data/nnUNet_raw:ro"
        -v "$DEMO/nnUNet_preprocessed:/data/nnUNet_preprocessed"
        -v "$DEMO/nnUNet_results:/data/nnUNet_results"
    )
    say "runs: as --user $run_user; host folders: $WORKSPACE -> /workspace, $DEMO/nnUNet_{raw (read-only),preprocessed,results} -> /data/nnUNet_*"

    # Runs the image with the common options; $1 names the step (log file, container name).
    run_step() {
        local name=$1
        shift
        docker_ run --rm --name "$CONTAINER_PREFIX-$name" "${run_options[@]}" "$@" >"$LOGS/$name.log" 2>&1
    }

    # The entrypoint without a command prints its usage; torch and the trainer look-up inside.
    if run_step usage "$IMAGE" && grep -q 'Usage: docker run' "$LOGS/usage.log"; then
        pass "usage: the image without a command prints the entrypoint's usage"
    else
        fail "usage: no usage text"
        show_tail "$LOGS/usage.log"
    fi
    if run_step imports "$IMAGE" python -c "$IMPORT_CHECK"; then
        pass "imports: $(tail -n 1 "$LOGS/imports.log")"
    else
        fail "imports: python in the image could not import torch/nnunetv2/nnunet_rndpo or find the trainer"
        show_tail "$LOGS/imports.log"
    fi

    # 1. The demo, writing to the mounted /workspace.
    demo_ok=0
    t0=$(now)
    if run_step demo "$IMAGE" nnunet_rndpo demo --quick && [ -f "$DEMO/demo_results.json" ] &&
        [ -f "$DEMO/nnUNet_results/$DATASET/nnUNetTrainer__nnUNetPlans__$CONFIGURATION/fold_0/checkpoint_final.pth" ]; then
        pass "demo: nnunet_rndpo demo --quick in $(($(now) - t0)) s; report and base model on the host"
        demo_ok=1
        grep -A5 'Held-out test Dice' "$LOGS/demo.log" | sed 's/^/      /' || true
    else
        fail "demo: nnunet_rndpo demo --quick failed or left no report/base model ($LOGS/demo.log)"
        show_tail "$LOGS/demo.log"
    fi

    # 2 and 3 need the demo's dataset and base model.
    if [ "$demo_ok" = 1 ]; then
        # 2. Training on the demo's dataset, stopped with docker stop after its first checkpoint, resumed with --c.
        TRAINING=$DEMO/nnUNet_results/$DATASET/${TRAINER}__nnUNetPlans__$CONFIGURATION/fold_0
        train_command=(nnUNetv2_train "$DATASET_ID" "$CONFIGURATION" 0 -tr "$TRAINER" -device cpu)
        settings_env=(-e RNDPO_SETTINGS=/workspace/rndpo_tiny_schedule.json)
        t0=$(now)
        docker_ run -d --name "$CONTAINER_PREFIX-train" "${run_options[@]}" "${settings_env[@]}" "$IMAGE" \
            "${train_command[@]}" >/dev/null
        # Wait for checkpoint_latest.pth (written after every epoch) and a little more, into the next epoch.
        # Up to 30 min: before its first epoch the trainer may fit its judge (the atlas judge's
        # registrations took 8 min on the machine in docker/README.md).
        stop_after=""
        for _ in $(seq 3600); do
            if [ -f "$TRAINING/checkpoint_latest.pth" ]; then
                stop_after=$(($(now) - t0))
                break
            fi
            [ "$(docker_ inspect -f '{{.State.Running}}' "$CONTAINER_PREFIX-train")" = true ] || break
            sleep 0.5
        done
        if [ -n "$stop_after" ] && [ ! -f "$TRAINING/checkpoint_final.pth" ]; then
            sleep 3
            t1=$(now)
            docker_ stop -t "$STOP_GRACE_S" "$CONTAINER_PREFIX-train" >/dev/null
            stop_s=$(($(now) - t1))
            docker_ logs "$CONTAINER_PREFIX-train" >"$LOGS/train.log" 2>&1
            exit_code=$(docker_ inspect -f '{{.State.ExitCode}}' "$CONTAINER_PREFIX-train")
            docker_ rm "$CONTAINER_PREFIX-train" >/dev/null
            # 130: the command ended on the SIGINT the entrypoint passed on (KeyboardInterrupt); 137 would be
            # docker's SIGKILL after the grace period.
            if [ "$exit_code" = 130 ] && [ "$stop_s" -lt "$STOP_GRACE_S" ] &&
                grep -q 'SIGTERM received; passing SIGINT on to nnUNetv2_train' "$LOGS/train.log"; then
                pass "stop: docker stop, 3 s after the first checkpoint (${stop_after} s into training), took ${stop_s} s (grace ${STOP_GRACE_S} s): exit code 130"
            else
                fail "stop: exit code $exit_code after ${stop_s} s (wanted 130, under ${STOP_GRACE_S} s; $LOGS/train.log)"
                show_tail "$LOGS/train.log"
            fi
            half_written=$(find "$WORK" -name '*.partial' -o -name '*.tmp' -o -size 0 -name '*.pth' | sed "s|^$WORK/||")
            if [ -z "$half_written" ]; then
                pass "stop: no half-written file (*.partial, *.tmp, empty *.pth) under the mounted folders"
            else
                fail "stop: half-written files stayed: $half_written"
            fi
            if [ -f "$TRAINING/checkpoint_final.pth" ]; then
                fail "stop: the training had finished before the stop; nothing to resume (make TINY_SCHEDULE longer)"
            fi
        else
            docker_ logs "$CONTAINER_PREFIX-train" >"$LOGS/train.log" 2>&1 || true
            docker_ rm -f "$CONTAINER_PREFIX-train" >/dev/null 2>&1 || true
            fail "train: no checkpoint_latest.pth appeared, or the training ended before it could be stopped ($LOGS/train.log)"
            show_tail "$LOGS/train.log"
        fi
        stopped_at_epoch=$(grep -oE 'Epoch [0-9]+' "$LOGS/train.log" | tail -n 1 | awk '{print $2}')

        t1=$(now)
        if run_step train-resumed "${settings_env[@]}" "$IMAGE" "${train_command[@]}" --c &&
            [ -f "$TRAINING/checkpoint_final.pth" ] && [ -f "$TRAINING/validation/summary.json" ]; then
            first_epoch=$(grep -oE 'Epoch [0-9]+' "$LOGS/train-resumed.log" | head -n 1 | awk '{print $2}')
            last_epoch=$(grep -oE 'Epoch [0-9]+' "$LOGS/train-resumed.log" | tail -n 1 | awk '{print $2}')
            if [ -n "$first_epoch" ] && [ "$first_epoch" -gt 0 ] && ! grep -q 'policy initialised from the base' "$LOGS/train-resumed.log"; then
                pass "resume: --c went on at epoch $first_epoch (stopped in epoch ${stopped_at_epoch:-?}) to epoch $last_epoch in $(($(now) - t1)) s; checkpoint_final.pth and validation on the host"
            else
                fail "resume: the resumed training started at epoch ${first_epoch:-?}, not after the stopped one ($LOGS/train-resumed.log)"
            fi
        else
            fail "resume: nnUNetv2_train --c failed or left no checkpoint_final.pth/validation ($LOGS/train-resumed.log)"
            show_tail "$LOGS/train-resumed.log"
        fi

        # 3. Predictions of the test images with the demo's nnUNetTrainerRNDPO model and with the one trained above;
        # without test-time mirroring, which multiplies a CPU's time by 8 and is not what is tested here.
        test_cases=$(find "$DEMO/nnUNet_raw/$DATASET/imagesTs" -name '*_0000.nii.gz' | wc -l)
        for trainer in nnUNetTrainerRNDPO "$TRAINER"; do
            out=predictions_$trainer
            t1=$(now)
            if run_step "predict-$trainer" "$IMAGE" nnUNetv2_predict -i "/data/nnUNet_raw/$DATASET/imagesTs" \
                -o "/workspace/$out" -d "$DATASET_ID" -c "$CONFIGURATION" -f 0 -tr "$trainer" -device cpu -npp 1 -nps 1 --disable_tta; then
                written=$(find "$WORKSPACE/$out" -name '*.nii.gz' | wc -l)
                if [ "$written" -eq "$test_cases" ] && [ "$test_cases" -gt 0 ]; then
                    pass "predict: -tr $trainer segmented the $test_cases test images in $(($(now) - t1)) s"
                else
                    fail "predict: -tr $trainer wrote $written of $test_cases segmentations"
                fi
            else
                fail "predict: nnUNetv2_predict -tr $trainer failed ($LOGS/predict-$trainer.log)"
                show_tail "$LOGS/predict-$trainer.log"
            fi
        done
    else
        skipped=$((skipped + 3))
        say "SKIP  stop, resume, predict: they need the demo's dataset and base model"
    fi

    # 4. Every file the containers wrote belongs to the user they ran as.
    files=$(find "$WORKSPACE" | wc -l)
    foreign=$(find "$WORKSPACE" \( ! -uid "$run_uid" -o ! -gid "$run_gid" \) -printf '%u:%g %P\n' | head -n 5)
    if [ -z "$foreign" ]; then
        pass "owner: all $files files and folders under $WORKSPACE belong to $run_user"
    else
        fail "owner: files not owned by $run_user, e.g.: $foreign"
    fi

    say ""
    say "load average at the end: $(cut -d' ' -f1-3 /proc/loadavg) (1, 5, 15 min; times above are wall-clock on a shared machine)"
    total_s=$(($(now) - started))
    if [ "$failed" -eq 0 ]; then
        say "SUMMARY: $passed passed, 0 failed, $skipped skipped in $((total_s / 60)) min $((total_s % 60)) s; logs in $LOGS"
        exit 0
    fi
    say "SUMMARY: $passed passed, $failed failed (${failures[*]}), $skipped skipped in $((total_s / 60)) min $((total_s % 60)) s; logs in $LOGS"
    exit 1
}

main "$@"
