#!/bin/sh
# keepalived vrrp_script: is the local appliance ready to take traffic?
#
#   check_ollama_lb.sh [PORT] [SCHEME]     (defaults: 8080 http)
#
# Probes /health/ready on loopback: 200 while at least one node can take a request and the
# appliance accepts (503 from the moment a SIGTERM starts its drain, so a planned stop moves
# the address before the port closes). Exit 0 = healthy; anything else lowers this VM's
# VRRP priority (or puts the instance in FAULT) and the peer takes the floating address.
# The 1 s bound keeps a hung appliance from stalling keepalived's checker.
port=${1:-8080}
scheme=${2:-http}
exec curl -fsS -o /dev/null --max-time 1 --insecure "$scheme://127.0.0.1:$port/health/ready"
