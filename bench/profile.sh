#!/usr/bin/env bash
# Profiling helpers for umbra's hot path (bench/NOTES.md, "How to profile").
# Instruction counts are repeatable on a noisy machine; wall-clock numbers
# are not, so the wall-clock modes alternate the binaries being compared.
#
#   bench/profile.sh callgrind HOST [BIN]       instructions per request (callgrind)
#   bench/profile.sh cpu HOST ROUNDS BIN...     req/s and CPU µs per request, wrk -c50
#                                               (CONNECTIONS=N for another count)
#   bench/profile.sh p50 HOST ROUNDS BIN...     p50 at one connection, wrk -c1
#
# A BIN of "nginx" is the bench's nginx proxy (worker_processes auto,
# upstream keep-alive, the mirror module), for side-by-side CPU figures.
#
# HOST picks the route: nomirror, mirror, analysis. POST=1 sends 256-byte
# POSTs instead of bodiless GETs. BIN defaults to target/release/umbra.
# Callgrind dumps stay in $WORK (printed); compare two with
# `callgrind_annotate --inclusive=yes A B`.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
LIB=$ROOT/bench/lib
mode=${1:?usage: profile.sh callgrind|cpu|p50 HOST ...}
host=${2:?HOST: nomirror, mirror or analysis}
shift 2
log() { echo "[profile] $*" >&2; }
for tool in nginx wrk h2load valgrind; do
  command -v "$tool" >/dev/null || { log "$tool is missing (bench/run.sh installs nginx, wrk, h2load)"; exit 1; }
done

WORK=$(mktemp -d "${TMPDIR:-/tmp}/umbra-profile.XXXXXX")
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT
read -r PRIMARY SHADOW LISTEN ADMIN <<<"$(python3 "$LIB/measure.py" freeports 4)"

nginx_head() { # nginx_head DIR WORKERS: an nginx.conf up to inside http {}
  cat <<EOF
worker_processes $2;
daemon off;
pid $1/nginx.pid;
error_log $1/error.log warn;
events { worker_connections 4096; }
http {
  client_body_temp_path $1/body;
  proxy_temp_path $1/proxy;
  fastcgi_temp_path $1/fastcgi;
  uwsgi_temp_path $1/uwsgi;
  scgi_temp_path $1/scgi;
  access_log off;
  keepalive_requests 1000000;
EOF
}

mkdir -p "$WORK/backend" "$WORK/config"
body=$(head -c 1024 /dev/zero | tr '\0' x)
{ nginx_head "$WORK/backend" 1; cat <<EOF; } >"$WORK/backend/nginx.conf"
  default_type text/plain;
  server { listen 127.0.0.1:$PRIMARY; location / { return 200 "$body"; } }
  server { listen 127.0.0.1:$SHADOW; location / { return 200 "$body"; } }
}
EOF
nginx -p "$WORK/backend" -c "$WORK/backend/nginx.conf" >"$WORK/backend/out.log" 2>&1 &
PIDS+=($!)

vs() { # vs NAME [MIRROR_SUBSET] [analysis-off]
  printf -- '---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: %s}\n' "$1"
  printf 'spec:\n  hosts: [%s]\n  http:\n  - route: [{destination: {host: backend, subset: v1}}]\n' "$1"
  [[ -n ${2:-} ]] && printf '    mirror: {host: backend, subset: %s}\n    mirrorPercentage: {value: 100.0}\n' "$2"
  [[ -n ${3:-} ]] && printf -- '---\napiVersion: umbra.io/v1alpha1\nkind: ShadowAnalysis\nmetadata: {name: %s}\nspec: {targetRef: {kind: VirtualService, name: %s}, enabled: false}\n' "$1" "$1"
  return 0
}
{
  cat <<EOF
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: backend}
spec:
  hosts: [backend]
  ports: [{number: 80, name: http, protocol: HTTP}]
  resolution: STATIC
  endpoints:
  - {address: 127.0.0.1, ports: {http: $PRIMARY}, labels: {version: v1}}
  - {address: 127.0.0.1, ports: {http: $SHADOW}, labels: {version: v2}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: backend}
spec:
  host: backend
  subsets: [{name: v1, labels: {version: v1}}, {name: v2, labels: {version: v2}}]
EOF
  vs nomirror
  vs mirror v2 off
  vs analysis v2
} >"$WORK/config/umbra.yaml"
python3 "$LIB/measure.py" wait-http "http://127.0.0.1:$PRIMARY/" >/dev/null

post_body=$WORK/post.json
python3 -c 'import json,sys; sys.stdout.write(json.dumps({"id": 1, "items": list(range(60))})[:256].ljust(256))' >"$post_body"
h2load_args=(--h1 -H ":authority: $host")  # h2load adds its own Host; -H host: would send two
[[ ${POST:-0} == 1 ]] && h2load_args+=(-d "$post_body")
wrk_env=()
[[ ${POST:-0} == 1 ]] && wrk_env=(WRK_BODY="$(cat "$post_body")")

nginx_proxy() { # the bench's nginx proxy (mirror module), on $LISTEN
  mkdir -p "$WORK/proxy"
  { nginx_head "$WORK/proxy" auto; cat <<EOF; } >"$WORK/proxy/nginx.conf"
  upstream primary { server 127.0.0.1:$PRIMARY; keepalive 64; keepalive_requests 1000000; }
  upstream shadow  { server 127.0.0.1:$SHADOW;  keepalive 64; keepalive_requests 1000000; }
  proxy_http_version 1.1;
  proxy_set_header Connection "";
  server { listen 127.0.0.1:$LISTEN default_server; server_name nomirror; location / { proxy_pass http://primary; } }
  server {
    listen 127.0.0.1:$LISTEN; server_name mirror analysis;
    location / { mirror /_shadow; proxy_pass http://primary; }
    location = /_shadow { internal; proxy_pass http://shadow\$request_uri; proxy_set_header Host \$host-shadow; }
  }
}
EOF
  exec nginx -p "$WORK/proxy" -c "$WORK/proxy/nginx.conf"
}
start() { # start BIN [WRAPPER...] -> PID; BIN "nginx" is the nginx proxy
  local bin=$1; shift
  if [[ $bin == nginx ]]; then
    nginx_proxy >"$WORK/umbra.log" 2>&1 &
  else
    "$@" "$bin" run --config "$WORK/config" --listen "127.0.0.1:$LISTEN" --admin "127.0.0.1:$ADMIN" \
    --access-log off --workers "${WORKERS:-2}" >"$WORK/umbra.log" 2>&1 &
  fi
  PID=$!
  python3 "$LIB/measure.py" wait-http "http://127.0.0.1:$LISTEN/" "$host" >/dev/null \
    || { tail "$WORK/umbra.log" >&2; exit 1; }
}
stop() { kill "$PID" 2>/dev/null || true; wait "$PID" 2>/dev/null || true; }
check() { ! grep -q 'Non-2xx' <<<"$1" || { log "non-2xx answers:"; echo "$1" >&2; exit 1; }; }
cpu_ticks() { # user and system ticks of PID and its children (nginx's workers)
  local pids; pids=$(pgrep -P "$1" | tr '\n' ' ')
  for p in $1 $pids; do cat "/proc/$p/stat"; done | awk '{u += $14; s += $15} END {print u, s}'
}
url=http://127.0.0.1:$LISTEN/

case $mode in
  callgrind)
    bin=${1:-$ROOT/target/release/umbra}
    n=${REQUESTS:-20000}
    WORKERS=1 start "$bin" valgrind --tool=callgrind --collect-atstart=yes \
      --callgrind-out-file="$WORK/callgrind.out.%p" -q
    h2load "${h2load_args[@]}" -n 5000 -c 10 "$url" >/dev/null
    callgrind_control -z "$PID" >/dev/null 2>&1
    sent=$(h2load "${h2load_args[@]}" -n "$n" -c 10 "$url")
    grep -q "^status codes: $n 2xx" <<<"$sent" || { log "not every request got a 2xx:"; grep -E '^(requests|status)' <<<"$sent" >&2; exit 1; }
    callgrind_control -d "$PID" >/dev/null 2>&1
    stop
    out=$WORK/callgrind.out.$PID.1
    total=$(callgrind_annotate "$out" 2>/dev/null | awk '/PROGRAM TOTALS/ {gsub(",", "", $1); print $1; exit}')
    echo "$host: $((total / n)) instructions per request ($out)"
    trap - EXIT; cleanup
    ;;
  cpu | p50)
    rounds=${1:?ROUNDS}; shift
    for ((r = 1; r <= rounds; r++)); do
      for bin in "$@"; do
        start "$bin"
        if [[ $mode == cpu ]]; then
          env "${wrk_env[@]}" wrk -t1 -c"${CONNECTIONS:-50}" -d1s -H "Host: $host" -s "$LIB/report.lua" "$url" >/dev/null
          before=$(cpu_ticks "$PID")
          out=$(env "${wrk_env[@]}" wrk -t1 -c"${CONNECTIONS:-50}" -d"${DURATION:-4}"s -H "Host: $host" -s "$LIB/report.lua" "$url")
          after=$(cpu_ticks "$PID")
          check "$out"
          rps=$(awk '/^Requests\/sec/ {print $2}' <<<"$out")
          reqs=$(awk '/requests in/ {print $1}' <<<"$out")
          tick=$(getconf CLK_TCK)
          us=$(python3 -c "
u0, s0, u1, s1 = map(int, '$before $after'.split()); per = 1e6 / $tick / $reqs
print(f'{(u1 + s1 - u0 - s0) * per:.2f} µs CPU per request (user {(u1 - u0) * per:.2f}, system {(s1 - s0) * per:.2f})')")
          echo "round $r $bin: $rps req/s, $us"
        else
          env "${wrk_env[@]}" wrk -t1 -c1 -d1s -H "Host: $host" "$url" >/dev/null
          out=$(env "${wrk_env[@]}" wrk -t1 -c1 -d"${DURATION:-3}"s --latency -H "Host: $host" -s "$LIB/report.lua" "$url")
          p50=$(awk '$1 == "50%" {print $2; exit}' <<<"$out")
          check "$out"
          echo "round $r $bin: p50 $p50"
        fi
        stop
      done
    done
    ;;
  *) log "unknown mode $mode"; exit 1 ;;
esac
