"""Measure the cloud service's throughput with 1 and 4 concurrent clients, side by side, in one run.

.venv/bin/python benchmarks/cloud_throughput.py [--model gemma3-270m] [--requests 8] [--max-tokens 64]
"""

from __future__ import annotations

import argparse
import json

from fedlm.bench.throughput import measure, warm_up
from fedlm.cloud.engine import Engine
from fedlm.cloud.service import background_service
from fedlm.models import CLOUD_DEFAULT, load


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=CLOUD_DEFAULT)
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--max-batch", type=int, default=8)
    args = parser.parse_args()
    engine = Engine(load(args.model, quiet=True), max_batch=args.max_batch)
    rows = []
    with background_service(engine) as url:
        warm_up(url)
        for clients in (1, 4):
            mark = len(engine.batch_sizes)
            row = measure(url, clients, requests=args.requests, max_tokens=args.max_tokens)
            steps = engine.batch_sizes[mark:]
            row["mean_batch"] = round(sum(steps) / len(steps), 2)
            rows.append(row)
            print(json.dumps({"model": args.model, **row}), flush=True)
    ratio = rows[1]["tokens_per_s"] / rows[0]["tokens_per_s"]
    print(json.dumps({"model": args.model, "throughput_4_clients_vs_1": round(ratio, 2)}))


if __name__ == "__main__":
    main()
