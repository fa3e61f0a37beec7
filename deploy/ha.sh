# shellcheck shell=bash
# `install.sh --ha`: keepalived (VRRP) moves a floating address (VIP) between two appliance
# VMs; its vrrp_script probes this VM's /health/ready. Sourced by install.sh and uninstall.sh
# after lib.sh. The options (set by install.sh) are:
#   HA_VIPS      one VIP (active/passive) or two (active/active: one VRRP instance each)
#   HA_ROLE      primary (priority 150 on the first VIP, 100 on the second) or secondary
#   HA_IF        the interface the VIPs live on (default: the default route's)
#   HA_PEERS     the peer VMs' addresses: adverts by unicast; none: multicast (224.0.0.18)
#   HA_SRC       this VM's unicast source address (default: HA_IF's first address)
#   HA_VRID      virtual_router_id of the first VIP (the second uses HA_VRID + 1)

KEEPALIVED_DIR=/etc/keepalived
KEEPALIVED_CONF="$KEEPALIVED_DIR/keepalived.conf"
HA_CHECK="$KEEPALIVED_DIR/check_ollama_lb.sh"
# What install.sh wrote into keepalived.conf (`sha256sum -c` tells whether it was edited since);
# its presence means install.sh created keepalived.conf, so uninstall.sh may remove it.
HA_SUM="$KEEPALIVED_DIR/ollama-lb.sha256"
# What install.sh would have written, when it keeps an edited (or someone else's) file.
HA_NEW="$KEEPALIVED_CONF.ollama-lb-new"
HA_VIPS=() HA_PEERS=() HA_ROLE="" HA_IF="" HA_SRC="" HA_VRID=51

# Refuse bad --ha options before install.sh changes anything (keepalived -t checks the rest).
check_ha_options() {
    local vip
    [ ${#HA_VIPS[@]} -ge 1 ] || die "--ha needs --ha-vip ADDR/PREFIX (twice for active/active)"
    [ ${#HA_VIPS[@]} -le 2 ] || die "--ha-vip at most twice (one VRRP instance per VIP)"
    for vip in "${HA_VIPS[@]}"; do
        [[ $vip == */[0-9]* ]] || die "--ha-vip $vip: give the prefix length, e.g. 10.0.0.100/24"
    done
    case $HA_ROLE in
        primary|secondary) ;;
        *) die "--ha needs --ha-role primary or --ha-role secondary (one VM each)" ;;
    esac
    if ! [[ $HA_VRID =~ ^[0-9]+$ ]] || [ "$HA_VRID" -lt 1 ] || [ "$HA_VRID" -gt 254 ]; then
        die "--ha-vrid takes 1-254 (the second VIP uses the next one)"
    fi
    # ip (not /sys/class/net, which a container may show from another namespace); without
    # iproute2 yet, resolve_ha_defaults checks it once the package is there
    if [ -n "$HA_IF" ] && command -v ip >/dev/null 2>&1; then
        ha_interface_exists || die "--ha-interface $HA_IF: no such interface here"
    fi
}

ha_interface_exists() {
    ip -o link show dev "$HA_IF" >/dev/null 2>&1
}

# The defaults that depend on this VM: the default route's interface, its first address of
# the VIP's family (the unicast source).
resolve_ha_defaults() {
    local family=-4
    [[ ${HA_VIPS[0]} == *:* ]] && family=-6
    if [ -z "$HA_IF" ]; then
        HA_IF=$(ip -o "$family" route show default | awk '{for (i = 1; i < NF; i++)
            if ($i == "dev") { print $(i + 1); exit }}')
        [ -n "$HA_IF" ] || die "no default route here: give --ha-interface IF"
    fi
    ha_interface_exists || die "--ha-interface $HA_IF: no such interface here"
    if [ -z "$HA_SRC" ] && [ ${#HA_PEERS[@]} -gt 0 ]; then
        HA_SRC=$(ip -o "$family" addr show dev "$HA_IF" scope global \
            | awk '{split($4, a, "/"); print a[1]; exit}')
        [ -n "$HA_SRC" ] || die "$HA_IF has no address for unicast VRRP: give --ha-src ADDR"
    fi
}

# ha_render RELEASE OUT: keepalived.conf for this VM from the template, with the check on
# the port (and scheme) of the config as RELEASE's loader reads it.
ha_render() {
    local vips peers
    vips=$(IFS=,; printf '%s' "${HA_VIPS[*]}")
    peers=$(IFS=,; printf '%s' "${HA_PEERS[*]}")
    "$1/bin/python" - "$CONFIG" "$DEPLOY_DIR/keepalived/keepalived.conf.template" "$HA_CHECK" \
        "$HA_ROLE" "$HA_IF" "$HA_SRC" "$HA_VRID" "$vips" "$peers" > "$2" <<'PY'
import ipaddress, re, socket, string, sys
from pipeline.config import load_config

config, template, check, role, iface, src, vrid, vips, peers = sys.argv[1:10]
vips, peers = vips.split(","), [p for p in peers.split(",") if p]
try:
    nets = [ipaddress.ip_interface(v) for v in vips]
    hosts = [ipaddress.ip_address(a) for a in peers + ([src] if peers else [])]
except ValueError as exc:
    sys.exit(f"ERROR: --ha-vip/--ha-peer/--ha-src: {exc}")
if len({a.version for a in nets + hosts}) > 1:
    sys.exit("ERROR: the VIPs, the peers and the source address: all IPv4 or all IPv6")
if src and src in peers or len(set(vips)) < len(vips):
    sys.exit("ERROR: a peer is this VM's own address, or the two VIPs are the same")
server = load_config(config).server
if server.host not in ("0.0.0.0", "::", ""):
    print(f"WARNING: server.host is {server.host}: the appliance must listen on 0.0.0.0 (or "
          "::) to answer on the VIP and on loopback, where the check probes", file=sys.stderr)
if server.tls.clientCaFile:
    print("WARNING: with mutual TLS the check (no client certificate) always fails: the VIP "
          "never stays here. See deploy/README.md.", file=sys.stderr)
lines = open(template).read().splitlines(keepends=True)
body = "".join(lines[next(i for i, line in enumerate(lines) if not line.startswith("#")):])
head, marker, instance = body.partition("vrrp_instance OLLAMA_LB_1 {")
instance = marker + instance
if not peers:  # multicast: no unicast lines at all
    instance, n = re.subn(r"\n *unicast_src_ip \$\{SRC_IP\}\n *unicast_peer \{\n"
                          r" *\$\{PEER_IP\}\n *\}", "", instance)
    assert n == 1, "the template's unicast lines changed"
adverts = f"unicast to {', '.join(peers)}" if peers else "multicast"
mode = "active/active" if len(vips) > 1 else "active/passive"
print(f"""# ollama-lb's keepalived.conf, written by `install.sh --ha` from keepalived.conf.template:
# {mode}, {role}, VIP {' and '.join(vips)},
# adverts by {adverts}.
# Runbook: /opt/ollama-lb/current/share/doc/ollama-lb/README.md, "Two VMs, one address".
# You may edit it: install.sh then keeps your file and writes what it would have written to
# keepalived.conf.ollama-lb-new (sha256sum -c /etc/keepalived/ollama-lb.sha256: unedited?).""")
if len(vips) > 1:  # each VM takes its own VIP back once repaired: both serve again
    instance, n = re.subn(r"\n *nopreempt\n", "\n    preempt_delay 30             # active/active:"
                          " a repaired VM takes its VIP back after 30 s\n", instance)
    assert n == 1, "the template's nopreempt line changed"
print(string.Template(head).substitute(
    ROUTER_ID=socket.gethostname(), CHECK=check, PORT=server.port,
    SCHEME="https" if server.tls.certFile else "http", CHECK_INTERVAL=1), end="")
priority = {"primary": (150, 100), "secondary": (100, 150)}[role]
for k, vip in enumerate(vips):
    print(("\n" if k else "") + string.Template(
        instance.replace("OLLAMA_LB_1", f"OLLAMA_LB_{k + 1}")).substitute(
        STATE="BACKUP", INTERFACE=iface, VRID=int(vrid) + k, PRIORITY=priority[k], ADVERT=1,
        SRC_IP=src, PEER_IP="\n        ".join(peers), VIP=vip), end="")
PY
}

# Put the rendered NEW in place by install.sh's rule for configs: never overwrite an edited
# file. Returns 0 when keepalived.conf was written, 1 when it already said that, 2 when an
# edited file (or one install.sh did not create) was kept and NEW went to $HA_NEW.
place_keepalived_conf() {
    local new=$1
    if [ -e "$KEEPALIVED_CONF" ] && cmp -s "$new" "$KEEPALIVED_CONF"; then
        rm -f "$HA_NEW"  # a merge by hand makes the file install.sh's (unedited) again
        [ ! -f "$HA_SUM" ] || sha256sum "$KEEPALIVED_CONF" > "$HA_SUM"
        return 1
    fi
    if [ ! -e "$KEEPALIVED_CONF" ] || { [ -f "$HA_SUM" ] \
            && sha256sum --status -c "$HA_SUM" 2>/dev/null; }; then
        install -m 0644 "$new" "$KEEPALIVED_CONF"
        sha256sum "$KEEPALIVED_CONF" > "$HA_SUM"
        rm -f "$HA_NEW"
        return 0
    fi
    install -m 0644 "$new" "$HA_NEW"
    return 2
}

# setup_ha RELEASE START: keepalived and curl, the check script, keepalived.conf (checked by
# keepalived -t first), and keepalived enabled (started when START=1, reloaded on a change).
setup_ha() {
    local release=$1 start=$2 new out placed=0
    ensure_packages keepalived curl iproute2
    resolve_ha_defaults
    install -d -m 0755 "$KEEPALIVED_DIR"
    # root-owned and not writable by others: keepalived's enable_script_security runs it
    install_if_changed "$DEPLOY_DIR/keepalived/check_ollama_lb.sh" "$HA_CHECK" 0755 || true
    new=$(mktemp "$KEEPALIVED_DIR/.keepalived.conf.XXXXXX")
    if ! ha_render "$release" "$new" || ! out=$(keepalived -t -f "$new" 2>&1); then
        rm -f "$new"
        die "keepalived refuses the rendered config, nothing changed: ${out:-see above}"
    fi
    place_keepalived_conf "$new" || placed=$?
    rm -f "$new"
    case $placed in
        0) say "wrote $KEEPALIVED_CONF (VIP ${HA_VIPS[*]} on $HA_IF, $HA_ROLE)" ;;
        1) say "keeping $KEEPALIVED_CONF (it already says that)" ;;
        2) warn "keeping the edited $KEEPALIVED_CONF; install.sh would write $HA_NEW:" \
               "diff -u $KEEPALIVED_CONF $HA_NEW, merge, then systemctl reload keepalived"
           if [ ! -f "$HA_SUM" ]; then
               warn "install.sh did not write $KEEPALIVED_CONF: keepalived is left as it is"
               return 0
           fi ;;
    esac
    systemctl enable --quiet keepalived
    if systemctl is-active --quiet keepalived; then
        [ "$placed" -ne 0 ] || systemctl reload keepalived
    elif [ "$start" -eq 1 ]; then
        systemctl start keepalived
    fi
}

# uninstall_ha PURGE: stop keepalived if install.sh set it up (the VIP moves to the peer),
# remove the check script; keepalived.conf only with PURGE=1, and only if install.sh wrote it.
uninstall_ha() {
    if [ -f "$HA_SUM" ]; then
        systemctl disable --now --quiet keepalived 2>/dev/null || true
        say "stopped keepalived: the floating address moves to the peer"
    fi
    rm -f "$HA_CHECK" "$HA_NEW"
    if [ -f "$HA_SUM" ] && [ "$1" -eq 1 ]; then
        rm -f "$KEEPALIVED_CONF" "$HA_SUM"
        say "purged $KEEPALIVED_CONF"
    elif [ -f "$HA_SUM" ]; then
        say "kept $KEEPALIVED_CONF (use --purge to remove it)"
    fi
}
