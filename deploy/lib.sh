#!/usr/bin/env bash
# Shared helpers for install.sh, upgrade.sh, rollback.sh and uninstall.sh. Sourced, not run.
# shellcheck disable=SC2034  # variables are used by the scripts that source this file

PREFIX=${OLLAMA_LB_PREFIX:-/opt/ollama-lb}
RELEASES="$PREFIX/releases"
CURRENT="$PREFIX/current"
PREVIOUS_FILE="$PREFIX/previous"
CONF_DIR=/etc/ollama-lb
CONFIG="$CONF_DIR/config.yaml"
ENV_FILE=/etc/default/ollama-lb
UNIT=/etc/systemd/system/ollama-lb.service
SOCKET_UNIT=/etc/systemd/system/ollama-lb.socket
SOCKET_DROPIN=/etc/systemd/system/ollama-lb.socket.d/listen.conf
SYSCTL=/etc/sysctl.d/60-ollama-lb.conf
SERVICE_USER=ollama-lb
SERVICE=ollama-lb
SOCKET=ollama-lb.socket
TLS_DIR="$CONF_DIR/tls"
TLS_CERT="$TLS_DIR/cert.pem"
TLS_KEY="$TLS_DIR/key.pem"
TLS_CLIENT_CA="$TLS_DIR/client-ca.pem"
DEPLOY_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

say() { printf '==> %s\n' "$*"; }
warn() { printf 'WARNING: %s\n' "$*" >&2; }
die() { printf 'ERROR: %s\n' "$*" >&2; exit 1; }

require_root() {
    [ "$(id -u)" -eq 0 ] || die "run me as root (sudo $0)"
}

# The newest wheel next to the scripts or in ../dist, unless one was given.
find_wheel() {
    local given=${1:-}
    if [ -n "$given" ]; then
        [ -f "$given" ] || die "no wheel at $given"
        printf '%s\n' "$given"
        return
    fi
    local found
    found=$(find "$DEPLOY_DIR" "$DEPLOY_DIR/../dist" -maxdepth 1 -name '*.whl' -printf '%T@ %p\n' \
        2>/dev/null | sort -rn | head -n 1 | cut -d' ' -f2- || true)
    [ -n "$found" ] || die "no wheel found: build one with 'make wheel' or pass --wheel FILE"
    printf '%s\n' "$found"
}

# ollama_load_balancer-1.2.3-py3-none-any.whl -> 1.2.3
wheel_version() {
    basename "$1" | cut -d- -f2
}

# A Python >= 3.11 for the release venvs: Debian 12 has it as python3; Ubuntu 22.04 ships
# 3.10 as python3 and 3.11 as python3.11 (install.sh installs that one there).
find_python() {
    local candidate
    for candidate in python3.13 python3.12 python3.11 python3; do
        if command -v "$candidate" >/dev/null 2>&1 && "$candidate" -c \
            'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' 2>/dev/null; then
            command -v "$candidate"
            return 0
        fi
    done
    return 1
}

# Install a wheel into releases/VERSION with its own venv; a complete release is kept as is.
install_release() {
    local wheel=$1 wheelhouse=${2:-} version dir
    version=$(wheel_version "$wheel")
    dir="$RELEASES/$version"
    if [ -x "$dir/bin/ollama-lb" ] && [ -f "$dir/.complete" ]; then
        say "release $version already installed in $dir"
        printf '%s\n' "$dir"
        return
    fi
    say "installing release $version into $dir" >&2
    rm -rf "$dir"
    mkdir -p "$RELEASES"
    local python
    python=$(find_python) || die "no Python >= 3.11 found (install.sh installs one)"
    "$python" -m venv "$dir" >&2
    local pip=("$dir/bin/pip" install --quiet --disable-pip-version-check)
    if [ -n "$wheelhouse" ]; then
        pip+=(--no-index --find-links "$wheelhouse")
    fi
    # env -i: no PIP_* settings from the caller's environment leak into the install
    env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root "${pip[@]}" "$wheel" >&2 \
        || { rm -rf "$dir"; die "pip could not install $wheel"; }
    mkdir -p "$dir/share/doc/ollama-lb"
    cp "$DEPLOY_DIR/README.md" "$dir/share/doc/ollama-lb/README.md"
    touch "$dir/.complete"
    printf '%s\n' "$dir"
}

# Point current at a release atomically (rename of a new symlink over the old one).
switch_current() {
    local target=$1
    ln -sfn "$target" "$CURRENT.new"
    mv -T "$CURRENT.new" "$CURRENT"
}

current_release() {
    readlink -f "$CURRENT" 2>/dev/null || true
}

# Where /health/live answers (https:// with server.tls), read from the config by the
# release's own loader.
health_url() {
    "$CURRENT/bin/python" - "$CONFIG" <<'PY'
import sys
from pipeline.config import load_config
c = load_config(sys.argv[1]).server
host = "127.0.0.1" if c.host in ("0.0.0.0", "") else ("::1" if c.host == "::" else c.host)
host = f"[{host}]" if ":" in host else host
print(f"{'https' if c.tls.certFile else 'http'}://{host}:{c.port}/health/live")
PY
}

# Wait until the service is active and /health/live answers 200. Over HTTPS the certificate
# is not checked (it names the public host, not loopback); with mutual TLS this probe has no
# client certificate, so "active" (READY=1: serving, certificate loaded) has to do.
wait_healthy() {
    local timeout=${1:-30} url deadline
    url=$(health_url) || return 1
    deadline=$((SECONDS + timeout))
    while [ "$SECONDS" -lt "$deadline" ]; do
        if systemctl is-active --quiet "$SERVICE" && "$CURRENT/bin/python" - "$url" "$CONFIG" <<'PY'
import ssl, sys, urllib.request
from pipeline.config import load_config
if load_config(sys.argv[2]).server.tls.clientCaFile:
    sys.exit(0)
try:
    reply = urllib.request.urlopen(sys.argv[1], timeout=2,
                                   context=ssl._create_unverified_context())
    sys.exit(0 if reply.status == 200 else 1)
except Exception:
    sys.exit(1)
PY
        then
            say "healthy: $url"
            return 0
        fi
        sleep 1
    done
    warn "not healthy after ${timeout}s ($url)"
    return 1
}

check_config() {
    "$1/bin/ollama-lb" check-config "$CONFIG"
}

# Fail unless CERT and KEY (and CA, if given) load as the appliance will load them, with the
# release RELEASE's Python: a mismatched pair or an encrypted key is refused before install.
check_tls_files() {
    "$1/bin/python" - "$2" "$3" "${4:-}" <<'PY'
import ssl, sys
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
try:
    ctx.load_cert_chain(sys.argv[1], sys.argv[2], password=lambda: b"")
    if sys.argv[3]:
        ctx.load_verify_locations(cafile=sys.argv[3])
except (OSError, ValueError) as exc:
    sys.exit(f"ERROR: cannot use {sys.argv[1]} with {sys.argv[2]}: {exc} "
             "(the key must match the certificate and be unencrypted)")
PY
}

# Copy CERT, KEY and optionally CA into $TLS_DIR, root:ollama-lb 0640 (the service reads them
# through its group). Each is written beside its final name, then renamed over it, the key
# first: the running service reloads changed files within a second and never reads half a
# file (a moment with the new key and the old certificate is refused and retried).
install_tls() {
    install -d -m 0750 -o root -g "$SERVICE_USER" "$TLS_DIR"
    install -m 0640 -o root -g "$SERVICE_USER" "$2" "$TLS_KEY.new"
    install -m 0640 -o root -g "$SERVICE_USER" "$1" "$TLS_CERT.new"
    if [ -n "${3:-}" ]; then
        install -m 0640 -o root -g "$SERVICE_USER" "$3" "$TLS_CLIENT_CA.new"
        mv -f "$TLS_CLIENT_CA.new" "$TLS_CLIENT_CA"
    fi
    mv -f "$TLS_KEY.new" "$TLS_KEY"
    mv -f "$TLS_CERT.new" "$TLS_CERT"
}

# Turn on the commented server.tls lines of FILE, a config written from the example; with
# WITH_CA=1 the clientCaFile line too (mutual TLS).
enable_tls_in_config() {
    sed -i -e 's|^  #tls:|  tls:|' -e 's|^  #  certFile:|    certFile:|' \
        -e 's|^  #  keyFile:|    keyFile:|' "$1"
    if [ "${2:-0}" -eq 1 ]; then
        sed -i 's|^  #  clientCaFile:|    clientCaFile:|' "$1"
    fi
}

# Print server.tls.certFile of the config ("" when TLS is off), by RELEASE's loader.
config_tls_cert() {
    "$1/bin/python" - "$CONFIG" <<'PY'
import sys
from pipeline.config import ConfigError, load_config
try:
    print(load_config(sys.argv[1]).server.tls.certFile or "")
except ConfigError:
    print("")  # check_config reports the problems
PY
}

# Copy SRC to DEST [MODE, default 0644; owned by root, as the scripts run as root] unless
# DEST already has that content; 0 if it was written.
install_if_changed() {
    if [ -f "$2" ] && cmp -s "$1" "$2"; then
        return 1
    fi
    install -D -m "${3:-0644}" "$1" "$2"
}

# apt-get install PKG... (after an update), without recommends, without questions.
apt_install() {
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@"
}

# Debian packages PKG... unless installed already (apt-get only then).
ensure_packages() {
    local pkg missing=()
    for pkg in "$@"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "ok installed" \
            || missing+=("$pkg")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    say "installing OS packages: ${missing[*]}"
    apt_install "${missing[@]}"
}

# The socket unit's drop-in: server.host, server.port and server.backlog from the config, read
# by the release's own loader (a host name is resolved once, here: systemd wants an address).
listen_dropin() {
    "$1/bin/python" - "$CONFIG" <<'PY'
import socket, sys
from pipeline.config import load_config
c = load_config(sys.argv[1]).server
if c.port == 0:
    sys.exit("server.port is 0: a systemd socket needs a fixed port")
host = socket.getaddrinfo(c.host or "0.0.0.0", c.port, type=socket.SOCK_STREAM)[0][4][0]
address = f"[{host}]:{c.port}" if ":" in host else f"{host}:{c.port}"
print(f"""# Written by install.sh/upgrade.sh from {sys.argv[1]}: edit the config, then run
# install.sh again (a changed address restarts the socket). Do not edit this file.
[Socket]
ListenStream=
ListenStream={address}
Backlog={c.backlog}""")
PY
}

# Install the service and socket units and the socket's drop-in for RELEASE; daemon-reload
# if anything changed. Sets LISTEN_CHANGED=1 when the drop-in (the address) changed.
install_units() {
    local release=$1 changed=0 dropin
    LISTEN_CHANGED=0
    install_if_changed "$DEPLOY_DIR/ollama-lb.service" "$UNIT" && changed=1
    install_if_changed "$DEPLOY_DIR/ollama-lb.socket" "$SOCKET_UNIT" && changed=1
    dropin=$(mktemp)
    if ! listen_dropin "$release" > "$dropin"; then
        rm -f "$dropin"
        die "cannot derive the listen address from $CONFIG"
    fi
    if install_if_changed "$dropin" "$SOCKET_DROPIN"; then
        changed=1
        LISTEN_CHANGED=1
    fi
    rm -f "$dropin"
    if [ "$changed" -eq 1 ]; then
        systemctl daemon-reload
    fi
}

# Make ollama-lb.socket listen where the config says. Hitless unless the address changed: a
# socket has to be rebound then, and a service from before the socket unit (which bound the
# port itself) has to stop first. Run install_units before.
apply_socket() {
    if systemctl is-active --quiet "$SOCKET"; then
        if [ "${LISTEN_CHANGED:-0}" -eq 1 ]; then
            say "the listen address changed: restarting $SOCKET and $SERVICE (not hitless)"
            systemctl stop "$SERVICE" "$SOCKET"
            systemctl start "$SOCKET"
        fi
        return 0
    fi
    if systemctl is-active --quiet "$SERVICE"; then
        say "moving the listening socket to $SOCKET (one restart that is not hitless)"
        systemctl stop "$SERVICE"
    fi
    systemctl start "$SOCKET"
}
