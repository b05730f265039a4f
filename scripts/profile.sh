#!/bin/sh
# Profile regproxy while scripts/bench.py runs one group of rows against it.
#
#   scripts/profile.sh GROUP [OUT] [-- more bench.py arguments]
#
# GROUP is one of bench.py's --only groups: pushes, small, gets, manifests, wrk, tags, proxy.
# py-spy (python3 -m pip install py-spy) samples the regproxy server process, all its
# threads, from the moment bench.py names its PID until the server stops at the end of the
# run, and writes OUT (default profile-GROUP.svg, a flame graph; an OUT ending in .txt gets
# collapsed stacks instead, one line per stack: grep them, or feed them to flamegraph.pl).
# With --workers N, only the supervisor is sampled: give py-spy a worker's PID instead.
# With proxy, each run starts fresh caches: the first regproxy cache is sampled (one cold
# pull and the warm pulls after it).
#
# Example: where a 64 MiB streamed PATCH spends its time, with fsync on:
#   scripts/profile.sh pushes pushes.svg -- --quick --runs 1
# and the manifest rows through wrk:
#   scripts/profile.sh wrk
#
# py-spy needs ptrace rights over the server (root, or kernel.yama.ptrace_scope=0).
# Run from the repository root with the code under test importable (PYTHONPATH=$PWD/src).
set -eu

group=${1:?usage: scripts/profile.sh GROUP [OUT] [-- bench.py arguments]}
shift
out=profile-$group.svg
if [ $# -gt 0 ] && [ "$1" != "--" ]; then
    out=$1
    shift
fi
[ $# -gt 0 ] && [ "$1" = "--" ] && shift
format=flamegraph
case $out in *.txt) format=raw ;; esac

command -v py-spy >/dev/null || { echo "profile.sh: py-spy is not installed" >&2; exit 1; }
log=$(mktemp)
trap 'rm -f "$log"' EXIT

python3 "$(dirname "$0")/bench.py" --only "$group" "$@" 2>"$log" &
bench=$!

# bench.py's first progress line: "... regproxy pid N at http://..."
pid=""
while [ -z "$pid" ] && kill -0 "$bench" 2>/dev/null; do
    sleep 0.2
    pid=$(sed -n 's/.*regproxy pid \([0-9]*\) at.*/\1/p' "$log" | head -n 1)
done
[ -n "$pid" ] || { cat "$log" >&2; echo "profile.sh: bench.py ended first" >&2; exit 1; }

py-spy record --pid "$pid" --rate 200 --threads --format "$format" --output "$out" >/dev/null &
spy=$!
status=0
wait "$bench" || status=$?
wait "$spy" || true
cat "$log" >&2
echo "profile of regproxy (pid $pid) while bench.py --only $group ran: $out" >&2
exit $status
