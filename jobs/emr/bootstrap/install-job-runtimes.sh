#!/usr/bin/env bash
# EMR bootstrap action: puts docflow's analytics jobs and their own runtimes on this node.
#
# EMR runs it on every node (master and core), as the hadoop user, before it installs the
# cluster's applications. It copies what `jobs/emr/submit.py stage` uploaded (the jobs' code,
# requirements files and Maven Central jars, and the launchers in bin/) to ROOT, then gives
# each job its own virtualenv built from that job's requirements.txt. The venvs live on every
# node because YARN may place a Flink JobManager/TaskManager or a Spark driver/executor on any
# of them, and each one starts the job's Python from ROOT/venvs/JOB/bin/python.
#
#   install-job-runtimes.sh --stage-uri s3://BUCKET/PREFIX --root /opt/docflow --python python3.11
#
# Layout it leaves (submit.py's NodeLayout names the same paths in the steps):
#   ROOT/jobs/JOB/...            the staged code, requirements.txt and lib/*.jar of each job
#   ROOT/venvs/JOB/              the job's virtualenv
#   ROOT/site-packages/JOB       link to that venv's site-packages (a path without the
#                                Python version in it: the Flink and Spark runtimes are in there)
#   ROOT/bin/                    docflow-flink and docflow-spark-submit
#   ROOT/log/                    client logs of the launchers
set -euo pipefail

log() {
    printf '%s docflow bootstrap: %s\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$*"
}

usage() {
    echo "usage: $0 --stage-uri s3://BUCKET/PREFIX --root DIR --python INTERPRETER" >&2
    exit 2
}

# The job runtimes need Python >= 3.10 (pyspark 4.1); EMR 7.x nodes have python3.9 as
# python3 and ship python3.11 beside it. The package is installed only where it is missing.
ensure_python() {
    local python=$1
    if ! command -v "$python" >/dev/null 2>&1; then
        log "$python not found, installing it from the distribution's repository"
        sudo dnf install -y "$python"
    fi
}

# ROOT belongs to the user that runs the bootstrap (hadoop), who also runs the EMR steps.
# /opt is root's, hence sudo; it is not needed where the user may create ROOT itself.
prepare_root() {
    local root=$1
    mkdir -p "$root" 2>/dev/null || sudo mkdir -p "$root"
    [[ -w "$root" ]] || sudo chown "$(id -un):$(id -gn)" "$root"
    mkdir -p "$root/jobs" "$root/venvs" "$root/site-packages" "$root/bin" "$root/log"
}

fetch_stage() {
    local stage_uri=$1 root=$2
    log "copying $stage_uri/jobs/ and $stage_uri/bin/ to $root"
    aws s3 cp --recursive --only-show-errors "$stage_uri/jobs/" "$root/jobs/"
    aws s3 cp --recursive --only-show-errors "$stage_uri/bin/" "$root/bin/"
    chmod 0755 "$root"/bin/*
}

create_venv() {
    local python=$1 venv=$2
    log "creating $venv with $python"
    "$python" -m venv "$venv"
}

install_requirements() {
    local venv=$1 requirements=$2
    log "installing $requirements into $venv"
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --requirement "$requirements"
}

link_site_packages() {
    local venv=$1 link=$2 purelib
    purelib=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    ln -sfn "$purelib" "$link"
}

main() {
    local stage_uri="" root="" python=""
    while [[ $# -gt 0 ]]; do
        case "$1" in
            --stage-uri) stage_uri=${2:?}; shift 2 ;;
            --root) root=${2:?}; shift 2 ;;
            --python) python=${2:?}; shift 2 ;;
            *) usage ;;
        esac
    done
    [[ -n "$stage_uri" && -n "$root" && -n "$python" ]] || usage

    ensure_python "$python"
    prepare_root "$root"
    fetch_stage "${stage_uri%/}" "$root"
    local job_dir job
    for job_dir in "$root"/jobs/*/; do
        job_dir=${job_dir%/}
        job=$(basename "$job_dir")
        [[ -f "$job_dir/requirements.txt" ]] || continue
        create_venv "$python" "$root/venvs/$job"
        install_requirements "$root/venvs/$job" "$job_dir/requirements.txt"
        link_site_packages "$root/venvs/$job" "$root/site-packages/$job"
    done
    log "done"
}

# Sourcing the file (the tests do) defines the functions without running anything.
if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
    main "$@"
fi
