#!/usr/bin/env bash
# Upgrade to a new release beside the old one; roll back by itself if the new one does not
# become healthy.
#
#   sudo deploy/upgrade.sh --wheel FILE [--wheelhouse DIR] [--timeout SECONDS]
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$(dirname "$0")/lib.sh"

WHEEL="" WHEELHOUSE="" TIMEOUT=30
while [ $# -gt 0 ]; do
    case $1 in
        --wheel) WHEEL=${2:?--wheel needs a file}; shift 2 ;;
        --wheelhouse) WHEELHOUSE=${2:?--wheelhouse needs a directory}; shift 2 ;;
        --timeout) TIMEOUT=${2:?--timeout needs seconds}; shift 2 ;;
        -h|--help) sed -n '2,/^set /{/^set /!p}' "$0"; exit 0 ;;
        *) die "unknown option $1 (see --help)" ;;
    esac
done
require_root
[ -L "$CURRENT" ] || die "ollama-lb is not installed here: run install.sh first"
WHEEL=$(find_wheel "$WHEEL")

old=$(current_release)
new=$(install_release "$WHEEL" "$WHEELHOUSE" | tail -n 1)
if [ "$old" = "$new" ]; then
    say "release $(basename "$new") is already current"
    exit 0
fi
check_config "$new" || die "the new release rejects $CONFIG; nothing changed"

say "switching $(basename "$old") -> $(basename "$new")"
printf '%s\n' "$old" > "$PREVIOUS_FILE"
switch_current "$new"
# The socket unit keeps listening through the restart: connections wait in its queue while
# the old process drains and the new one starts (units from this bundle, if they changed).
install_units "$new"
apply_socket
systemctl restart "$SERVICE" || true
if wait_healthy "$TIMEOUT"; then
    say "upgraded to $(basename "$new"); the previous release stays in $old for rollback.sh"
    exit 0
fi

warn "the new release is not healthy: rolling back to $(basename "$old")"
journalctl -u "$SERVICE" -n 20 --no-pager >&2 || true
switch_current "$old"
systemctl reset-failed "$SERVICE" "$SOCKET" 2>/dev/null || true
systemctl restart "$SERVICE"
wait_healthy "$TIMEOUT" || die "the old release is not healthy either: journalctl -u $SERVICE"
die "upgrade to $(basename "$new") failed; running $(basename "$old") again"
