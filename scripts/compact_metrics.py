"""Round the floats of metrics.jsonl files to 5 significant digits in place (keeps recorded runs small).

python scripts/compact_metrics.py data/countdown_runs/*/metrics.jsonl
"""

import json
import sys


def _round(v):
    return float(f"{v:.5g}") if isinstance(v, float) else v


for path in sys.argv[1:]:
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps({k: _round(v) for k, v in row.items()}) + "\n")
