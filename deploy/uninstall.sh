#!/usr/bin/env bash
# Remove ollama-lb, and what --workers (ollama-lb-redis.service) and --ha (keepalived's check
# script; keepalived is stopped and disabled) installed. Keeps /etc/ollama-lb,
# /etc/default/ollama-lb, the keepalived.conf install.sh wrote, the service user and the
# journal unless --purge. Debian packages install.sh added (keepalived, redis-server, ...) stay.
#
#   sudo deploy/uninstall.sh [--purge]
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$(dirname "$0")/lib.sh"
# shellcheck source-path=SCRIPTDIR source=workers.sh
. "$(dirname "$0")/workers.sh"
# shellcheck source-path=SCRIPTDIR source=ha.sh
. "$(dirname "$0")/ha.sh"

PURGE=0
while [ $# -gt 0 ]; do
    case $1 in
        --purge) PURGE=1; shift ;;
        -h|--help) sed -n '2,/^set /{/^set /!p}' "$0"; exit 0 ;;
        *) die "unknown option $1 (see --help)" ;;
    esac
done
require_root

# keepalived first: the floating address moves to the peer before this appliance stops
uninstall_ha "$PURGE"
if systemctl list-unit-files "$SERVICE.service" >/dev/null 2>&1; then
    systemctl disable --now --quiet "$SERVICE" "$SOCKET" 2>/dev/null || true
fi
uninstall_workers "$PURGE"
rm -f "$UNIT" "$SOCKET_UNIT" "$SYSCTL"
rm -rf "$(dirname "$SOCKET_DROPIN")"
systemctl daemon-reload
systemctl reset-failed "$SERVICE" "$SOCKET" ollama-lb-redis.service 2>/dev/null || true
rm -rf "$PREFIX"
say "removed the service and $PREFIX"

if [ "$PURGE" -eq 1 ]; then
    rm -rf "$CONF_DIR" "$ENV_FILE"
    if id "$SERVICE_USER" >/dev/null 2>&1; then
        userdel "$SERVICE_USER" 2>/dev/null || warn "could not remove user $SERVICE_USER"
    fi
    say "purged $CONF_DIR, $ENV_FILE and user $SERVICE_USER"
else
    say "kept $CONF_DIR and $ENV_FILE (use --purge to remove them); logs stay in the journal"
fi
