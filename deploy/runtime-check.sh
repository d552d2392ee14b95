#!/usr/bin/env bash
# Runs a caddy binary with the container's Caddyfile under the constraints the
# Kubernetes manifests give the pod, without Docker or a cluster: its own
# network namespace (only loopback), uid/gid 65532, no capabilities at all
# (empty bounding set, no_new_privs), a read-only config file, writable data
# and config directories only, and ports below 1024 opened by the sysctl
# net.ipv4.ip_unprivileged_port_start=0 alone. Then it checks:
#   - without the sysctl, binding :80 fails (so the sysctl is what opens them);
#   - with it, every port of the Deployment listens;
#   - :8199 answers /healthz and /metrics (whatsapp_proxy_* series) and
#     nothing else (no admin API there); the admin API answers on loopback;
#   - a WhatsApp chat hello on :5222 is taken by wa_proxy (counted in
#     whatsapp_proxy_connections_total; its dial fails: no network here);
#   - a connection to :8222 without a PROXY header is not proxied.
#
#   sudo deploy/runtime-check.sh ./caddy
#
# Needs root (to make the namespace), util-linux (unshare, setpriv), procps
# (sysctl), iproute2 (ip) and curl.
set -euo pipefail
caddy=$(realpath "${1:?usage: runtime-check.sh <caddy binary>}")
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

if ((EUID != 0)); then
	echo "runtime-check: needs root (to make a network namespace and switch users)" >&2
	exit 1
fi
for tool in unshare setpriv sysctl curl ip; do
	command -v "$tool" >/dev/null || { echo "runtime-check: $tool not found (util-linux, procps, curl, iproute2)" >&2; exit 1; }
done
if [[ ${WAPROXY_IN_NETNS:-} != 1 ]]; then
	exec unshare --net env WAPROXY_IN_NETNS=1 "$0" "$caddy"
fi

fail() { echo "runtime-check: FAIL: $*" >&2; exit 1; }
ip link set lo up || fail "cannot bring up loopback"

scratch=$(mktemp -d)
pid=""
cleanup() {
	if [[ -n $pid ]]; then kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; fi
	rm -rf "$scratch"
}
trap cleanup EXIT
mkdir -p "$scratch/etc" "$scratch/data" "$scratch/config"
cp "$here/kubernetes/Caddyfile" "$scratch/etc/Caddyfile"
chmod 0444 "$scratch/etc/Caddyfile"
chmod 0755 "$scratch" "$scratch/etc"
chown 65532:65532 "$scratch/data" "$scratch/config"

as_pod() { # runs a command as the pod's user, with no capabilities
	setpriv --reuid=65532 --regid=65532 --clear-groups --no-new-privs \
		--inh-caps=-all --ambient-caps=-all --bounding-set=-all \
		env -i PATH=/usr/bin:/bin HOME=/nonexistent XDG_DATA_HOME="$scratch/data" XDG_CONFIG_HOME="$scratch/config" "$@"
}

echo "== without the sysctl: :80 must be refused"
sysctl -qw net.ipv4.ip_unprivileged_port_start=1024
if as_pod "$caddy" run --config "$scratch/etc/Caddyfile" --adapter caddyfile >"$scratch/denied.log" 2>&1; then
	fail "caddy ran without the sysctl"
fi
grep -q 'permission denied' "$scratch/denied.log" || { cat "$scratch/denied.log"; fail "no 'permission denied' without the sysctl"; }
echo "ok: $(grep -o 'listen tcp [^ ]*: bind: permission denied' "$scratch/denied.log" | head -1)"

echo "== with net.ipv4.ip_unprivileged_port_start=0"
sysctl -qw net.ipv4.ip_unprivileged_port_start=0
as_pod "$caddy" run --config "$scratch/etc/Caddyfile" --adapter caddyfile >"$scratch/caddy.log" 2>&1 &
pid=$!
for _ in $(seq 100); do
	curl -fsS http://127.0.0.1:8199/healthz >/dev/null 2>&1 && break
	kill -0 "$pid" 2>/dev/null || { cat "$scratch/caddy.log"; fail "caddy exited"; }
	sleep 0.1
done
[[ $(curl -fsS http://127.0.0.1:8199/healthz) == ok ]] || fail "/healthz"
echo "ok: /healthz"
for port in 80 443 5222 587 7777 8080 8443 8222 8199; do
	(exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null || fail "nothing listens on :$port"
done
echo "ok: 80 443 5222 587 7777 8080 8443 8222 8199 listen"
curl -fsS http://127.0.0.1:8199/metrics | grep -q '^whatsapp_proxy_connections_total' || fail "/metrics has no whatsapp_proxy_connections_total"
echo "ok: /metrics"
code=$(curl -s -o /dev/null -w '%{http_code}' http://127.0.0.1:8199/config/)
[[ $code == 404 ]] || fail "/config/ on :8199 answered $code, want 404"
code=$(curl -s -o /dev/null -w '%{http_code}' -X POST -H 'Content-Type: application/json' -d '{}' http://127.0.0.1:8199/load)
[[ $code == 404 ]] || fail "POST /load on :8199 answered $code, want 404"
echo "ok: no admin API on :8199"
curl -fsS http://127.0.0.1:2019/config/ >/dev/null || fail "the admin API does not answer on loopback"
echo "ok: admin API on 127.0.0.1:2019 (the pod's loopback)"

total() { curl -fsS http://127.0.0.1:8199/metrics | awk '$1 == "whatsapp_proxy_connections_total" {print $2}'; }
before=$(total)
# WA header, then a 36-byte frame (Noise ClientHello): 57 41 06 03 00 00 24 ...
{ printf 'WA\x06\x03\x00\x00\x24\x12\x22\x0a\x20'; head -c 32 /dev/zero; sleep 1; } | timeout 10 bash -c 'exec 3<>/dev/tcp/127.0.0.1/5222; cat >&3; cat <&3 >/dev/null' || true
for _ in $(seq 50); do [[ $(total) != "$before" ]] && break; sleep 0.1; done
after=$(total)
[[ $after != "$before" ]] || fail "the chat hello on :5222 was not counted ($before → $after)"
echo "ok: a chat hello on :5222 reached wa_proxy (connections_total $before → $after)"

before=$(total)
{ printf 'WA\x06\x03\x00\x00\x24\x12\x22\x0a\x20'; head -c 32 /dev/zero; sleep 1; } | timeout 10 bash -c 'exec 3<>/dev/tcp/127.0.0.1/8222; cat >&3; cat <&3 >/dev/null' || true
sleep 0.5
[[ $(total) == "$before" ]] || fail "a connection without a PROXY header on :8222 was proxied"
echo "ok: :8222 without a PROXY header is not proxied"

kill "$pid"
wait "$pid" 2>/dev/null || true
pid=""
# Expected errors: the port probes above close during matching, the :8222
# client sent no PROXY header, and the chat dial has no network.
if grep -v -E '"msg":"(matching connection|dial upstream|handling connection)|dial|lookup' "$scratch/caddy.log" | grep -E '"level":"(error|fatal)"|panic'; then
	fail "unexpected errors in caddy's log"
fi
echo "runtime-check: ok"
