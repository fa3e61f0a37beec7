#!/usr/bin/env bash
# Install ollama-lb on a fresh Debian 12 / Ubuntu 22.04+ VM. Idempotent: run it again to
# repair an install; it never overwrites an operator's config.
#
#   sudo deploy/install.sh [--wheel FILE] [--wheelhouse DIR] [--no-start]
#                          [--tls-cert FILE --tls-key FILE [--tls-client-ca FILE]] [--tls-only]
#                          [--workers N|auto]
#                          [--ha --ha-vip ADDR/PREFIX [--ha-vip ADDR/PREFIX]
#                           --ha-role primary|secondary [--ha-peer ADDR]... [--ha-interface IF]
#                           [--ha-src ADDR] [--ha-vrid N]]
#
#   --wheel FILE      the appliance wheel (default: the newest in deploy/ or dist/; `make wheel`)
#   --wheelhouse DIR  install dependencies from DIR only (VMs without a package index); make one
#                     with `pip download --only-binary=:all: -d DIR FILE.whl`
#   --no-start        install and enable, but do not start the service (nor keepalived)
#   --tls-cert FILE   PEM certificate (then its chain) for HTTPS, copied to /etc/ollama-lb/tls/
#   --tls-key FILE    its unencrypted PEM key (root:ollama-lb 0640 once installed)
#   --tls-client-ca FILE  CA certificates for mutual TLS: clients must present one they signed
#   --tls-only        only install the TLS files (a renewal): the running service picks them
#                     up within a second, without a restart
#   --workers N|auto  N worker processes on the port, sharing node caps through a local
#                     redis-server on a Unix socket (installed and started here)
#   --ha              keepalived (VRRP): a floating address shared with a peer VM, moved when
#                     this appliance fails its /health/ready check (deploy/README.md)
#   --ha-vip ADDR/PREFIX  the floating address; twice for active/active (two VRRP instances,
#                     one VIP normally on each VM)
#   --ha-role primary|secondary  primary: priority 150 on the first VIP (100 on the second);
#                     secondary: the reverse. One VM of each.
#   --ha-peer ADDR    the other VM's address: VRRP by unicast (repeatable; clouds without
#                     multicast); without it, multicast
#   --ha-interface IF the VIPs' interface (default: the default route's)
#   --ha-src ADDR     unicast source (default: the interface's first address)
#   --ha-vrid N       virtual_router_id of the first VIP, 1-254, unique on the segment
#                     (default 51; a second VIP uses N+1)
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$(dirname "$0")/lib.sh"
# shellcheck source-path=SCRIPTDIR source=workers.sh
. "$(dirname "$0")/workers.sh"
# shellcheck source-path=SCRIPTDIR source=ha.sh
. "$(dirname "$0")/ha.sh"

WHEEL="" WHEELHOUSE="" START=1 CERT="" KEY="" CLIENT_CA="" TLS_ONLY=0
WORKERS="" HA=0
while [ $# -gt 0 ]; do
    case $1 in
        --wheel) WHEEL=${2:?--wheel needs a file}; shift 2 ;;
        --wheelhouse) WHEELHOUSE=${2:?--wheelhouse needs a directory}; shift 2 ;;
        --no-start) START=0; shift ;;
        --tls-cert) CERT=${2:?--tls-cert needs a file}; shift 2 ;;
        --tls-key) KEY=${2:?--tls-key needs a file}; shift 2 ;;
        --tls-client-ca) CLIENT_CA=${2:?--tls-client-ca needs a file}; shift 2 ;;
        --tls-only) TLS_ONLY=1; shift ;;
        --workers) WORKERS=${2:?--workers needs a number or auto}; shift 2 ;;
        --ha) HA=1; shift ;;
        --ha-vip) HA_VIPS+=("${2:?--ha-vip needs ADDR/PREFIX}"); shift 2 ;;
        --ha-role) HA_ROLE=${2:?--ha-role needs primary or secondary}; shift 2 ;;
        --ha-peer) HA_PEERS+=("${2:?--ha-peer needs an address}"); shift 2 ;;
        --ha-interface) HA_IF=${2:?--ha-interface needs an interface}; shift 2 ;;
        --ha-src) HA_SRC=${2:?--ha-src needs an address}; shift 2 ;;
        --ha-vrid) HA_VRID=${2:?--ha-vrid needs 1-254}; shift 2 ;;
        -h|--help) sed -n '2,/^set /{/^set /!p}' "$0"; exit 0 ;;
        *) die "unknown option $1 (see --help)" ;;
    esac
done
require_root
if { [ -n "$CERT" ] || [ -n "$KEY" ]; } && { [ -z "$CERT" ] || [ -z "$KEY" ]; }; then
    die "--tls-cert and --tls-key go together"
fi
[ -z "$CLIENT_CA" ] || [ -n "$CERT" ] || die "--tls-client-ca needs --tls-cert and --tls-key"
if [ "$HA" -eq 1 ]; then
    check_ha_options
elif [ ${#HA_VIPS[@]} -gt 0 ] || [ -n "$HA_ROLE$HA_IF$HA_SRC" ] || [ ${#HA_PEERS[@]} -gt 0 ]; then
    die "the --ha-* options go with --ha"
fi

# A certificate renewal: the files only; the service reloads them itself.
if [ "$TLS_ONLY" -eq 1 ]; then
    [ -n "$CERT" ] || die "--tls-only needs --tls-cert and --tls-key"
    [ -L "$CURRENT" ] || die "ollama-lb is not installed here: run install.sh without --tls-only"
    check_tls_files "$CURRENT" "$CERT" "$KEY" "$CLIENT_CA" || die "nothing was changed"
    install_tls "$CERT" "$KEY" "$CLIENT_CA"
    say "installed $TLS_CERT and $TLS_KEY; new connections use them within a second"
    [ "$(config_tls_cert "$CURRENT")" = "$TLS_CERT" ] \
        || warn "$CONFIG does not use $TLS_CERT (server.tls.certFile): see deploy/README.md"
    exit 0
fi
WHEEL=$(find_wheel "$WHEEL")

# 1. OS packages: Python with venv, CA certificates, kill (ExecReload) from procps.
ensure_packages python3 python3-venv ca-certificates procps
if ! find_python >/dev/null; then  # Ubuntu 22.04: python3 is 3.10, 3.11 is packaged apart
    say "installing python3.11 (the system python3 is older than 3.11)"
    apt_install python3.11 python3.11-venv
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
written=0
if [ ! -e "$CONFIG" ]; then
    say "writing $CONFIG from the example: edit the nodes list"
    install -m 0640 -o root -g "$SERVICE_USER" "$DEPLOY_DIR/config.example.yaml" "$CONFIG"
    written=1
else
    say "keeping the existing $CONFIG"
fi
if [ ! -e "$ENV_FILE" ]; then
    install -m 0640 -o root -g "$SERVICE_USER" "$DEPLOY_DIR/ollama-lb.env" "$ENV_FILE"
fi

# 4b. TLS: the certificate and key in /etc/ollama-lb/tls, readable by the service's group.
if [ -n "$CERT" ]; then
    check_tls_files "$CURRENT" "$CERT" "$KEY" "$CLIENT_CA" || die "fix the TLS files"
    install_tls "$CERT" "$KEY" "$CLIENT_CA"
    say "installed $TLS_CERT and $TLS_KEY${CLIENT_CA:+ and $TLS_CLIENT_CA}"
    if [ "$written" -eq 1 ]; then
        enable_tls_in_config "$CONFIG" "$([ -n "$CLIENT_CA" ] && echo 1 || echo 0)"
        say "HTTPS turned on in $CONFIG"
    elif [ "$(config_tls_cert "$CURRENT")" != "$TLS_CERT" ]; then
        warn "$CONFIG does not use them yet: add under server:"
        printf '  tls:\n    certFile: %s\n    keyFile: %s\n' "$TLS_CERT" "$TLS_KEY" >&2
        [ -z "$CLIENT_CA" ] || printf '    clientCaFile: %s\n' "$TLS_CLIENT_CA" >&2
        warn "then run install.sh again (switching between HTTP and HTTPS takes a restart)"
    fi
fi
# 4c. Workers (--workers N): a local Redis for their shared node caps, the config keys.
[ -z "$WORKERS" ] || setup_workers "$CURRENT" "$WORKERS" "$written"
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
# 7. The floating address (--ha), once the appliance is healthy: the check passes at once.
[ "$HA" -eq 0 ] || setup_ha "$CURRENT" "$START"

tls_state="off: plain HTTP (install.sh --tls-cert F --tls-key F turns HTTPS on)"
if [ -n "$(config_tls_cert "$CURRENT")" ]; then
    tls_state="HTTPS, files in $TLS_DIR (renew: install.sh --tls-only --tls-cert F --tls-key F)"
fi
ha_state="off (install.sh --ha ...: deploy/README.md, \"Two VMs, one address\")"
if [ -f "$HA_SUM" ]; then
    ha_state="keepalived, $KEEPALIVED_CONF (journalctl -u keepalived; ip -o addr show)"
fi
cat <<INFO

ollama-lb $(wheel_version "$WHEEL") is installed.
  release:  $release (current -> $(current_release))
  config:   $CONFIG   (edit it: changes apply on save; bad files are refused and logged)
  env:      $ENV_FILE (OLLAMA_LB_ADMIN_TOKEN)
  tls:      $tls_state
  service:  systemctl status $SERVICE; journalctl -u $SERVICE -f
  socket:   $SOCKET listens (address from $CONFIG; after changing server.host/port, run
            install.sh again); restarts and upgrades refuse no connection
  health:   $(health_url)
  ha:       $ha_state
  upgrade:  deploy/upgrade.sh --wheel NEW.whl; rollback: deploy/rollback.sh
INFO
