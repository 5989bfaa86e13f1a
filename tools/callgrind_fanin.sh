#!/bin/bash
# Instructions per message of a real mqttd under callgrind in a C-generator fan-in (robust on a
# shared machine, where timings swing by a third): the broker from TREE (default: this
# checkout) runs under valgrind --tool=callgrind; its counters are zeroed just before the
# generator's go and dumped after the last message; total / messages is printed.
#   tools/callgrind_fanin.sh [TREE] [QOS] [PUBLISHERS] [MESSAGES_EACH]
# e.g. tools/callgrind_fanin.sh . 0 4 5000 (needs valgrind and the C generator in build/,
# which `make bench` builds).
set -euo pipefail
TREE=$(cd "${1:-$(dirname "$0")/..}" && pwd); QOS=${2:-0}; PUBS=${3:-4}; MSGS=${4:-5000}
HERE=$(cd "$(dirname "$0")/.." && pwd)
GEN=$(ls -t "$HERE"/build/cloadgen-* | head -1)
PY=${PYTHON:-$HERE/.venv/bin/python}
PORT=$(python3 -c "import socket;s=socket.socket();s.bind(('127.0.0.1',0));print(s.getsockname()[1])")
D=$(mktemp -d)
printf "listeners:\n  - host: 127.0.0.1\n    port: $PORT\npersistence:\n  data_dir: $D/data\nlogging:\n  level: warning\nlimits:\n  max_queued_messages: 100000000\n  qos0_buffer_bytes: 1073741824\n" > "$D/c.yaml"
cd "$TREE"
PYTHONHASHSEED=0 valgrind --tool=callgrind --callgrind-out-file="$D/cg.%p" "$PY" -m mqttd --config "$D/c.yaml" > "$D/log" 2>&1 &
BP=$!
trap 'kill $BP 2>/dev/null; wait $BP 2>/dev/null; rm -rf "$D"' EXIT
for _ in $(seq 600); do (echo > /dev/tcp/127.0.0.1/$PORT) 2>/dev/null && break; sleep 0.2; done
(sleep 8; callgrind_control -z $BP >/dev/null; echo go) | timeout 900 "$GEN" --mode fanin --port "$PORT" \
  --publishers "$PUBS" --messages "$MSGS" --qos "$QOS" --window 32 --timeout 600 --broker-pid $BP \
  | grep -o '"delivered": *[0-9]*\|"lost": *[0-9]*' | tr '\n' ' ' || true
echo
callgrind_control -d $BP >/dev/null
sleep 2
TOTAL=$(grep -h "^summary:" "$D"/cg.* | awk '{print $2}' | sort -n | tail -1)
echo "$TREE QoS $QOS: $((TOTAL / (PUBS * MSGS))) instructions per message"
