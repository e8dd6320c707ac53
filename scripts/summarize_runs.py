"""Print the table of recorded Countdown runs (mean and spread over seeds for each method).

python scripts/summarize_runs.py [data/countdown_runs]
"""

from __future__ import annotations

import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path


def _fmt(xs: list[float], pct: bool = True) -> str:
    scale = 100 if pct else 1
    m = statistics.mean(xs) * scale
    s = statistics.stdev(xs) * scale if len(xs) > 1 else 0.0
    return f"{m:5.1f} ± {s:4.1f}" if pct else f"{m:.2e} ± {s:.1e}"


def main(root: str = "data/countdown_runs") -> None:
    rows: dict[str, list[dict]] = defaultdict(list)
    for f in sorted(Path(root).glob("*/summary.json")):
        s = json.loads(f.read_text())
        rows[s["regularizer"]].append(s)
    if not rows:
        raise SystemExit(f"no recorded runs under {root}")
    print(f"{'method':<9s} {'seeds':>5s} {'greedy start':>14s} {'greedy final':>14s} {'sampled start':>14s} "
          f"{'sampled final':>14s} {'tail>top10 (last 10%)':>22s} {'PPO s':>6s}")  # fmt: skip
    for kind in ("none", "entropy", "tre-k", "tre-p", "forking", "kl-cov", "clip-cov"):
        if kind not in rows:
            continue
        rs = rows[kind]

        def col(which: str, key: str, rs: list[dict] = rs) -> list[float]:
            return [r[which][key] for r in rs]

        print(
            f"{kind:<9s} {len(rs):5d} {_fmt(col('eval_start', 'eval/greedy_accuracy')):>14s} "
            f"{_fmt(col('eval_final', 'eval/greedy_accuracy')):>14s} "
            f"{_fmt(col('eval_start', 'eval/sampled_accuracy')):>14s} "
            f"{_fmt(col('eval_final', 'eval/sampled_accuracy')):>14s} "
            f"{_fmt(col('train_last10pct', 'tail/mass_outside_top10'), pct=False):>22s} "
            f"{statistics.mean(r['seconds_ppo'] for r in rs):6.0f}"
        )


if __name__ == "__main__":
    main(*sys.argv[1:])
