#!/bin/sh
# Sim container: personalize the virtual SIM once (bootstrap certificate from the dev PKI's
# bootstrap CA), then run the given command (`est-agent sim serve ...`).
set -eu

state=${SIM_STATE:-/state/sim.json}
if [ ! -f "$state" ]; then
    est-agent sim init "$state" \
        --bootstrap-ca /pki/bootstrap-ca.pem --bootstrap-ca-key /pki/bootstrap-ca.key
fi
exec "$@"
