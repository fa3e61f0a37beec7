# shellcheck shell=bash
# `install.sh --workers N`: N worker processes need a Redis for their node caps (each worker is
# an appliance instance; without shared state each would allow each node its whole cap, and
# the appliance refuses to start). Sourced by install.sh and uninstall.sh after lib.sh.

REDIS_UNIT=/etc/systemd/system/ollama-lb-redis.service
REDIS_SOCK=/run/ollama-lb-redis/redis.sock
WORKERS_DROPIN=/etc/systemd/system/ollama-lb.service.d/redis.conf

# Install redis-server (Debian package), our own instance of it on a Unix socket, and order
# the appliance after it. The package's default instance (127.0.0.1:6379, no password) is
# stopped and disabled when the package is installed here for us; one that was there before
# is someone else's and left alone.
install_local_redis() {
    if ! command -v redis-server >/dev/null 2>&1; then
        say "installing redis-server (the workers share node caps through it)"
        apt_install redis-server
        systemctl disable --now --quiet redis-server.service 2>/dev/null || true
        say "the package's own redis-server.service (127.0.0.1:6379) is not needed: disabled"
    fi
    install -m 0644 "$DEPLOY_DIR/ollama-lb-redis.service" "$REDIS_UNIT"
    install -d -m 0755 "$(dirname "$WORKERS_DROPIN")"
    printf '[Unit]\nWants=ollama-lb-redis.service\nAfter=ollama-lb-redis.service\n' \
        > "$WORKERS_DROPIN"
    systemctl daemon-reload
    systemctl enable --quiet --now ollama-lb-redis.service
}

# Print "WORKERS REDIS_URL" as RELEASE's loader reads CONFIG ("? ?" when it does not load).
config_workers() {
    "$1/bin/python" - "$CONFIG" <<'PY'
import sys
from pipeline.config import ConfigError, load_config
try:
    c = load_config(sys.argv[1])
    print(c.server.workers, c.sharedState.redisUrl or "-")
except ConfigError:
    print("? ?")
PY
}

# setup_workers RELEASE N WRITTEN: the local Redis, and the two keys in a config install.sh
# wrote just now (WRITTEN=1); an operator's config is never edited, only told what to add.
setup_workers() {
    local release=$1 n=$2 written=$3 have url
    case $n in auto|[1-9]|[1-9][0-9]) ;; *) die "--workers takes a number or auto, got $n" ;; esac
    [ "$n" = 1 ] && return 0
    install_local_redis
    if [ "$written" -eq 1 ]; then
        sed -i "s|^  backlog: \(.*\)$|  backlog: \1\n  workers: $n   # install.sh --workers|" \
            "$CONFIG"
        printf '\n# install.sh --workers: the workers count node caps in the local Redis\n' \
            >> "$CONFIG"
        printf 'sharedState:\n  redisUrl: unix://%s\n' "$REDIS_SOCK" >> "$CONFIG"
        say "$CONFIG: server.workers $n, sharedState.redisUrl unix://$REDIS_SOCK"
        return 0
    fi
    read -r have url < <(config_workers "$release")
    if [ "$url" = "-" ] || [ "$have" != "$n" ]; then
        warn "$CONFIG is kept as it is; for $n workers it needs (then run install.sh again):"
        printf 'server:\n  workers: %s\nsharedState:\n  redisUrl: unix://%s\n' \
            "$n" "$REDIS_SOCK" >&2
    fi
}

# uninstall_workers PURGE: the local Redis's unit and the appliance's drop-in for it (the
# redis-server package stays, like the other packages install.sh added). The drop-in
# directory goes only if nothing else is in it, or with PURGE=1 (an operator's overrides).
uninstall_workers() {
    if [ -f "$REDIS_UNIT" ]; then
        systemctl disable --now --quiet ollama-lb-redis.service 2>/dev/null || true
        rm -f "$REDIS_UNIT"
        say "removed ollama-lb-redis.service"
    fi
    rm -f "$WORKERS_DROPIN"
    if [ "$1" -eq 1 ]; then
        rm -rf "$(dirname "$WORKERS_DROPIN")"
    else
        rmdir "$(dirname "$WORKERS_DROPIN")" 2>/dev/null || true
    fi
}
