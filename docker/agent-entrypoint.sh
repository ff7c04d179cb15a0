#!/bin/sh
# Agent container: start pcscd with vsmartcard's vpcd driver (vpcd listens on 0.0.0.0:35963,
# where the `sim` service connects), wait until a card is present, then run the given command.
set -eu

rm -f /run/pcscd/pcscd.comm        # left behind if a previous container run was killed
pcscd -f &
pcscd_pid=$!

# A card appears 0.1-0.5 s after the sim connects; give the sim service time to start.
tries=0
until est-agent card info --reader pcsc: >/dev/null 2>&1; do
    tries=$((tries + 1))
    if [ "$tries" -ge 60 ]; then
        echo "agent: no card in the vpcd reader after 60 s" >&2
        kill "$pcscd_pid"
        exit 69
    fi
    sleep 1
done

status=0
"$@" || status=$?
kill "$pcscd_pid" 2>/dev/null || true
wait "$pcscd_pid" 2>/dev/null || true
exit "$status"
