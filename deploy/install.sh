#!/usr/bin/env bash
# Install ollama-lb on a fresh Debian 12 / Ubuntu 22.04+ VM. Idempotent: run it again to
# repair an install; it never overwrites an operator's config.
#
#   sudo deploy/install.sh [--wheel FILE] [--wheelhouse DIR] [--no-start]
#
#   --wheel FILE      the appliance wheel (default: the newest in deploy/ or dist/; `make wheel`)
#   --wheelhouse DIR  install dependencies from DIR only (VMs without a package index); make one
#                     with `pip download --only-binary=:all: -d DIR FILE.whl`
#   --no-start        install and enable, but do not start the service
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$(dirname "$0")/lib.sh"

WHEEL="" WHEELHOUSE="" START=1
while [ $# -gt 0 ]; do
    case $1 in
        --wheel) WHEEL=${2:?--wheel needs a file}; shift 2 ;;
        --wheelhouse) WHEELHOUSE=${2:?--wheelhouse needs a directory}; shift 2 ;;
        --no-start) START=0; shift ;;
        -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
        *) die "unknown option $1 (see --help)" ;;
    esac
done
require_root
WHEEL=$(find_wheel "$WHEEL")

# 1. OS packages: Python with venv, CA certificates, kill (ExecReload) from procps.
missing=()
for pkg in python3 python3-venv ca-certificates procps; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "ok installed" || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
    say "installing OS packages: ${missing[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
if ! find_python >/dev/null; then  # Ubuntu 22.04: python3 is 3.10, 3.11 is packaged apart
    say "installing python3.11 (the system python3 is older than 3.11)"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        python3.11 python3.11-venv
fi

# 2. The service user: no login, no home to speak of.
if ! id "$SERVICE_USER" >/dev/null 2>&1; then
    say "creating system user $SERVICE_USER"
    useradd --system --user-group --home-dir /nonexistent --no-create-home \
        --shell /usr/sbin/nologin "$SERVICE_USER"
fi

# 3. The release, in its own venv, and the current symlink.
release=$(install_release "$WHEEL" "$WHEELHOUSE" | tail -n 1)
old=$(current_release)
if [ -n "$old" ] && [ "$old" != "$release" ]; then
    printf '%s\n' "$old" > "$PREVIOUS_FILE"
fi
switch_current "$release"

# 4. Config and environment: written only if absent, readable by the service user only.
install -d -m 0750 -o root -g "$SERVICE_USER" "$CONF_DIR"
if [ ! -e "$CONFIG" ]; then
    say "writing $CONFIG from the example: edit the nodes list"
    install -m 0640 -o root -g "$SERVICE_USER" "$DEPLOY_DIR/config.example.yaml" "$CONFIG"
else
    say "keeping the existing $CONFIG"
fi
if [ ! -e "$ENV_FILE" ]; then
    install -m 0640 -o root -g "$SERVICE_USER" "$DEPLOY_DIR/ollama-lb.env" "$ENV_FILE"
fi
check_config "$CURRENT" || die "$CONFIG is invalid; fix it and run me again"

# 5. Kernel network tuning (global keys cannot be set inside a container: reported, not fatal).
install -m 0644 "$DEPLOY_DIR/sysctl-ollama-lb.conf" "$SYSCTL"
sysctl -q -p "$SYSCTL" >/dev/null 2>&1 || warn "some sysctl keys could not be applied here"

# 6. The units: the socket (address and backlog from the config, in a drop-in) holds the
#    listening socket across restarts; the service takes it over.
install_units "$CURRENT"
systemctl enable --quiet "$SOCKET" "$SERVICE"
if [ "$START" -eq 1 ]; then
    apply_socket
    if systemctl is-active --quiet "$SERVICE"; then
        systemctl restart "$SERVICE"
    else
        systemctl start "$SERVICE"
    fi
    wait_healthy 30 || die "the service did not become healthy: journalctl -u $SERVICE"
fi

cat <<INFO

ollama-lb $(wheel_version "$WHEEL") is installed.
  release:  $release (current -> $(current_release))
  config:   $CONFIG   (edit it: changes apply on save; bad files are refused and logged)
  env:      $ENV_FILE (OLLAMA_LB_ADMIN_TOKEN)
  service:  systemctl status $SERVICE; journalctl -u $SERVICE -f
  socket:   $SOCKET listens (address from $CONFIG; after changing server.host/port, run
            install.sh again); restarts and upgrades refuse no connection
  health:   $(health_url)
  upgrade:  deploy/upgrade.sh --wheel NEW.whl; rollback: deploy/rollback.sh
INFO
