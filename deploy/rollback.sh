#!/usr/bin/env bash
# Switch back to the previous release and restart.
#
#   sudo deploy/rollback.sh [--to VERSION]
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$(dirname "$0")/lib.sh"

TO=""
while [ $# -gt 0 ]; do
    case $1 in
        --to) TO=${2:?--to needs a version}; shift 2 ;;
        -h|--help) sed -n '2,4p' "$0"; exit 0 ;;
        *) die "unknown option $1 (see --help)" ;;
    esac
done
require_root
current=$(current_release)
[ -n "$current" ] || die "ollama-lb is not installed here"

if [ -n "$TO" ]; then
    target="$RELEASES/$TO"
elif [ -f "$PREVIOUS_FILE" ]; then
    target=$(cat "$PREVIOUS_FILE")
else  # the newest other release
    target=$(find "$RELEASES" -mindepth 1 -maxdepth 1 -type d -printf '%T@ %p\n' \
        | sort -rn | cut -d' ' -f2- | grep -vx "$current" | head -n 1 || true)
fi
if [ -z "$target" ] || [ ! -x "$target/bin/ollama-lb" ]; then
    die "no release to roll back to"
fi
[ "$target" != "$current" ] || die "$(basename "$target") is already current"

say "rolling back $(basename "$current") -> $(basename "$target")"
printf '%s\n' "$current" > "$PREVIOUS_FILE"
switch_current "$target"
systemctl reset-failed "$SERVICE" "$SOCKET" 2>/dev/null || true
systemctl restart "$SERVICE"
wait_healthy 30 || die "$(basename "$target") is not healthy: journalctl -u $SERVICE"
say "running $(basename "$target")"
