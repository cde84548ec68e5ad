#!/usr/bin/env bash
# Runs the federated app in Flower's Deployment Runtime with TLS and SuperNode authentication (throwaway keys):
# one SuperLink and three SuperNodes (budgets low, mid,
# high via --node-config), all on 127.0.0.1, offline; `fedlm train` starts them and stops only those processes.
# MODEL defaults to a tiny random model so that this finishes in about a minute; pass MODEL=smollm2-135m-instruct
# for the real edge model.
set -euo pipefail
BIN=${BIN:-.venv/bin}
OUT=${OUT:-runs/federated-deployment}
MODEL=${MODEL:-}
if [ -z "$MODEL" ]; then
    MODEL=$OUT-tiny-model
    "$BIN/python" -c "from fedlm.models.tiny import save_tiny; save_tiny('$MODEL')"
fi
rm -rf "$OUT"
"$BIN/fedlm" train --runtime deployment --model "$MODEL" --data mix --clients 3 --rounds 2 --local-steps 2 \
    --seq-len 32 --max-texts 12 --aggregator hetlora --out "$OUT"
"$BIN/python" - "$OUT" <<'PY'
import json, sys
rounds = json.load(open(f"{sys.argv[1]}/metrics.json"))
assert [r["round"] for r in rounds] == [1, 2], rounds
for r in rounds:
    ranks = {c["partition_id"]: c["rank"] for c in r["clients"]}
    print(f"round {r['round']}: ranks {ranks}, upload {r['bytes_up']} B, download {r['bytes_down']} B")
print("deployment runtime: OK")
PY
