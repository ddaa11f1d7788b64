#!/bin/sh
# Entrypoint of the docflow image: every argument goes to the `docflow` CLI,
# e.g. `worker --role web` (the image's default command).
#
# With several web replicas, Faust's table routing forwards a request to the replica
# that owns the document's partition, at that worker's canonical URL. Compose cannot
# put a per-container value in the environment, so it is computed here: this
# container's own address on its network (first IPv4 of `hostname -i`, else the
# hostname, which Docker's DNS resolves too) and the web port. Set
# DOCFLOW_WEB_CANONICAL_URL yourself to override it (behind a proxy, say).
set -eu

if [ -z "${DOCFLOW_WEB_CANONICAL_URL:-}" ]; then
    address=""
    for candidate in $(hostname -i 2>/dev/null || true); do
        case "$candidate" in
            *:*|127.*) ;;  # IPv6 (would need brackets) or loopback: useless to other containers
            *) address="$candidate"; break ;;
        esac
    done
    if [ -z "$address" ]; then
        address="$(hostname 2>/dev/null || cat /etc/hostname)"
    fi
    DOCFLOW_WEB_CANONICAL_URL="http://${address}:${DOCFLOW_WEB_PORT:-6066}"
    export DOCFLOW_WEB_CANONICAL_URL
fi

exec docflow "$@"
