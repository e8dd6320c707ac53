"""Rewrite the README's study table and the numbers of its four-claim verdicts from the recorded study.

    python scripts/readme_evidence.py [data/results/tail_leak] [--figures docs/figures/tail_leak]

The table between ``<!-- study-table:start -->`` and ``<!-- study-table:end -->`` becomes exactly what
``tre-edu study report data/results/tail_leak`` prints (tests/test_study.py checks it); ``--figures`` writes the
report's figures too; the text between ``<!-- study-claims:start -->`` and ``<!-- study-claims:end -->``
is the template below with every number taken from the aggregated lines (paired differences to PPO, seed by seed).
The verdict words (held / mixed / did not hold) are the template's; the qualitative statements they rest on ("not
distinguishable from PPO", "collapses", "no regulariser beats PPO", ...) are checked against the numbers first
(``_checks``): when one fails, only the table (and figures) are rewritten, the script names the statement and exits
with status 1, and the template must be reread and edited.
"""

from __future__ import annotations

import argparse
import math
import re
from pathlib import Path

from tre_edu import study

ROOT = Path(__file__).resolve().parent.parent
CLAIMS = """The four claims of PAPER.md, against this evidence (Δ = paired difference in greedy accuracy to PPO, in
points, mean ± 95 % t-interval over seeds). A run *leaked* when at least half of its sampled responses at the end hold
a tail token; in this study the runs fall far on either side of that line (leaked: {LEAK_MIN}-100 %; all others
<= {NOLEAK_MAX} %).

1. *The global gradient raises every tail logit; TRE's is zero outside A_TR* — **held** (exact; tests, notebooks 01
   and 02; on SmolLM2's real logits the global gradient raises a median of 49,149 of 49,152 logits, TRE-K moves 2).
2. *Under the global bonus the tail mass grows with V; under TRE it stays* — **held in training, as a tipping
   event.** The global bonus at 0.01 leaked in {LEAKS_E2KC} / {LEAKS_E2KT} seeds at tail 2,000 (compact / think)
   and {LEAKS_E20KC} / {LEAKS_E20KT} at tail 20,000; a leaked run ends with a mass outside the top 10 of
   {LEAK_MASS} and every or nearly every sampled response holding a tail token (at 20,000, think: {E20K_T} %, PPO
   {N20K_T} %). PPO, TRE-K at the same effective weight, and every TRE-K / TRE-P, forking and KL-Cov run of the grid
   never leaked ({NOLEAK_RUNS} runs, at most {NOLEAK_OTHERS} % tail-token responses), even where TRE destroys accuracy
   (below). Short of a leak the bonus still raises the tail a little: at 2,000, think, its seeds that did not leak
   end at {E2KT_SAFE} % vs PPO's {N2K_T} %.
3. *The chance of a tail token in a response grows with T* — **held**, with a caveat. Arithmetic and Monte Carlo in
   notebook 02; in training the leak is more likely at the longer horizon: {LEAKS_E2KC} → {LEAKS_E2KT} seeds at
   tail 2,000 and {LEAKS_E20KC} → {LEAKS_E20KT} at 20,000 (compact, ~12 tokens → think, ~27 tokens); PPO's own
   tail-token responses go from {N20K_C} to {N20K_T} % at 20,000. The caveat: the long horizon does not only
   multiply the per-token chance, it also makes the collapse more likely (we think: more positions carry the
   bonus's gradient per response, and a broken trace gets no reward to pull it back), so the jump is larger than
   1 − (1 − ε)^T alone predicts.
4. *On Countdown the global bonus hurts as V and T grow; TRE keeps or improves accuracy* — **mixed.**
   - *The global bonus hurts as V and T grow*: **held.** At 0.01 it collapses the policy in every seed at
     V = 20,033 with the think horizon (Δ {DE20KT}); below that the damage is the chance of a leak, so the mean
     paired Δ is small and its interval wide: Δ {DE0C} / {DE0T} (tail 0, compact / think), {DE2KC} / {DE2KT} (2,000;
     per seed greedy {E2KT_GREEDY} % vs PPO's {N2KT_GREEDY} % at think), {DE20KC} (20,000, compact; the leaked seed
     kept {E20KC_LEAK_GREEDY} % greedy: its samples leak before its greedy answer does). Over the coefficient
     (tail 20,000, think): Δ {DE001} at 0.001, {DE003} at 0.003, {DE01} at 0.01, {DE03} at 0.03.
   - *TRE keeps accuracy*: **held at small effective weights, not in paper units.** TRE-K at the global bonus's
     effective weight (0.01 per nat: coefficient 0.00198 / 0.00091 / 0.0007 at tail 0 / 2,000 / 20,000) keeps PPO's
     accuracy (not distinguishable from PPO) at every tail and horizon: Δ {DK0C} / {DK0T} (tail 0, compact /
     think), {DK2KC} / {DK2KT} (2,000), {DK20KC} / {DK20KT} (20,000). The live cell's pair (compact, 20,000): global
     0.03 Δ {DLIVE_E}, TRE-K 0.002 (the same effective weight 0.029) Δ {DLIVE_K}. But in paper units TRE is **not**
     safe at every coefficient: TRE-K's rescaling log V / log 2 makes 0.003 weigh 0.043 and 0.01 weigh 0.14 per nat,
     and there it flattens the top two choices and breaks the answer without any leak: Δ {DK003} at 0.003 and {DK01}
     at 0.01 (tail 20,000, think); TRE-P {DP003} at 0.003. In your own runs, `--regularizer.rescale false` gives
     TRE's coefficient per nat (the global bonus's units).
   - *TRE improves accuracy*: **did not hold here.** No regulariser beats PPO with a paired interval above 0: the
     best are {BEST}. Forking tokens are below PPO (Δ {DFORK}, lower in every seed); KL-Cov is not distinguishable
     from it (Δ {DKLCOV}).
   Why, we think: 60 PPO steps on a 0.8M-parameter model (plus 128 parameters per tail token) with 3-number puzzles
   leave little room for exploration to pay — sampling at temperature 1 already explores (pass@8 is {P8LO}-{P8HI}
   points above pass@1 for every method that did not collapse) — and a gain of a few points would sit inside this
   study's paired intervals.
   Tuning: every method had the same budget (the same recipe, 60 steps, the coefficient grid, the same seeds);
   nothing else was tuned."""
EFF_001 = {0: 0.00198, 2000: 0.00091, 20000: 0.0007}  # TRE-K at the global bonus's effective weight 0.01 per nat


def _row(rows: list[dict], tail, horizon, method, coef=None) -> dict:
    for r in rows:
        if (r["tail"], r["horizon"], r["method"], r["coefficient"]) == (tail, horizon, method, coef):
            return r
    raise KeyError(f"no recorded cell tail {tail}, {horizon}, {method} {coef}")


def _lookups(rows: list[dict]):
    """row(tail, horizon, method, coef), and the global bonus (default 0.01), PPO and TRE-K at the global bonus's
    effective weight of one (tail, horizon)."""
    row = lambda *a: _row(rows, *a)  # noqa: E731
    ent = lambda t, h, c=0.01: row(t, h, "entropy", c)  # noqa: E731
    none = lambda t, h: row(t, h, "none")  # noqa: E731
    trek = lambda t, h: row(t, h, "tre-k", EFF_001[t])  # noqa: E731
    return row, ent, none, trek


def _seed_values(r: dict, key: str) -> list[float]:
    return [e[key] for _, e in sorted(r["per_seed"].items()) if key in e]


def _runs(rows: list[dict], leaked: bool) -> list[tuple[dict, dict]]:
    """(row, per-seed values) of every run at a tail > 0 that leaked / did not leak."""
    return [
        (r, e)
        for r in rows
        for e in r["per_seed"].values()
        if "tail_response_frac" in e and (e["tail_response_frac"] >= study.LEAK_FRAC) == leaked
    ]


def _numbers(rows: list[dict]) -> dict[str, str]:
    row, ent, none, trek = _lookups(rows)

    def frac(r):
        m, hw = r["final"]["tail_response_frac"]
        return f"{100 * m:.1f}" + ("" if math.isnan(hw) else f" ± {100 * hw:.1f}")

    def delta(r):
        m, hw = r["delta"]["greedy_accuracy"]
        return ("+" if m >= 0 else "") + f"{100 * m:.1f}" + (" (1 seed)" if math.isnan(hw) else f" ± {100 * hw:.1f}")

    def seeds(values):
        return " / ".join(f"{100 * v:.1f}" for v in values)

    def leaks(r):
        n, of = study.leaked_seeds(r)
        return f"{n} of {of}"

    leaked, safe = _runs(rows, True), _runs(rows, False)
    e2kt, e20kc = ent(2000, "think"), ent(20000, "compact")
    gaps = [
        100 * (r["final"]["pass@8"][0] - r["final"]["sampled_accuracy"][0])
        for r in rows
        if r["final"]["greedy_accuracy"][0] > 0.1 and "pass@8" in r["final"]
    ]
    best = sorted(
        (r for r in rows if r["delta"].get("greedy_accuracy")), key=lambda r: -r["delta"]["greedy_accuracy"][0]
    )
    name = lambda r: r["method"] + ("" if r["coefficient"] is None else f" {r['coefficient']:g}")  # noqa: E731
    masses = [e["mass_outside_top10"] for r, e in leaked if r["coefficient"] == 0.01]
    return {
        "LEAK_MIN": f"{100 * min(e['tail_response_frac'] for _, e in leaked):.0f}",
        "NOLEAK_MAX": f"{100 * max(e['tail_response_frac'] for _, e in safe):.0f}",
        "NOLEAK_RUNS": str(sum(1 for r, _ in safe if r["method"] != "entropy")),
        "NOLEAK_OTHERS": f"{100 * max(e['tail_response_frac'] for r, e in safe if r['method'] != 'entropy'):.0f}",
        "LEAK_MASS": f"{min(masses):.2f}-{max(masses):.2f}",
        **{f"LEAKS_E{k}": leaks(ent(t, h)) for k, t, h in _CELLS if t},
        "E20K_T": frac(ent(20000, "think")),
        "N20K_T": frac(none(20000, "think")),
        "N20K_C": frac(none(20000, "compact")),
        "N2K_T": frac(none(2000, "think")),
        "E2KT_SAFE": seeds(f for f in _seed_values(e2kt, "tail_response_frac") if f < study.LEAK_FRAC),
        "E2KT_GREEDY": seeds(_seed_values(e2kt, "greedy_accuracy")),
        "N2KT_GREEDY": seeds(_seed_values(none(2000, "think"), "greedy_accuracy")),
        "E20KC_LEAK_GREEDY": seeds(
            e["greedy_accuracy"]
            for _, e in sorted(e20kc["per_seed"].items())
            if e["tail_response_frac"] >= study.LEAK_FRAC
        ),
        **{f"DE{k}": delta(ent(t, h)) for k, t, h in _CELLS},
        **{f"DK{k}": delta(trek(t, h)) for k, t, h in _CELLS},
        **{
            f"DE{k}": delta(ent(20000, "think", c))
            for k, c in (("001", 0.001), ("003", 0.003), ("01", 0.01), ("03", 0.03))
        },
        "DLIVE_E": delta(row(20000, "compact", "entropy", 0.03)),
        "DLIVE_K": delta(row(20000, "compact", "tre-k", 0.002)),
        "DK003": delta(row(20000, "think", "tre-k", 0.003)),
        "DK01": delta(row(20000, "think", "tre-k", 0.01)),
        "DP003": delta(row(20000, "think", "tre-p", 0.003)),
        "DFORK": delta(row(20000, "think", "forking")),
        "DKLCOV": delta(row(20000, "think", "kl-cov")),
        "P8LO": f"{min(gaps):.0f}",
        "P8HI": f"{max(gaps):.0f}",
        "BEST": "; ".join(f"{name(r)} (tail {r['tail']:,}, {r['horizon']}) Δ {delta(r)}" for r in best[:3]),
    }


def _checks(rows: list[dict]) -> list[str]:
    """The template's qualitative statements that the aggregated rows contradict (empty: all hold). "Not
    distinguishable" = the paired 95 % interval of Δ greedy covers 0; "below" = it lies below 0."""
    row, ent, _, trek = _lookups(rows)
    n = lambda t, h: study.leaked_seeds(ent(t, h))[0]  # noqa: E731
    seeds_20kt = study.leaked_seeds(ent(20000, "think"))[1]

    def dg(r):  # (low, high) of the paired interval of Δ greedy; a single seed: (mean, mean)
        m, hw = r["delta"]["greedy_accuracy"]
        hw = 0.0 if math.isnan(hw) else hw
        return m - hw, m + hw

    def same(r):
        lo, hi = dg(r)
        return lo <= 0 <= hi

    def frac(r):
        return r["final"]["tail_response_frac"][0]

    def lower_every_seed(r, b):
        return all(r["per_seed"][s]["greedy_accuracy"] < b["per_seed"][s]["greedy_accuracy"] for s in b["per_seed"])

    both = [(t, h) for t in EFF_001 for h in ("compact", "think")]
    leaked, safe = _runs(rows, True), _runs(rows, False)
    e2kt = ent(2000, "think")
    statements = [
        (
            "the runs fall far on either side of the leak line: leaked >= 90 %, the others <= 20 % tail responses",
            min(e["tail_response_frac"] for _, e in leaked) >= 0.9
            and max(e["tail_response_frac"] for _, e in safe) <= 0.2,
        ),
        (
            "claim 2: only the global bonus leaked (no PPO, TRE-K, TRE-P, forking or KL-Cov run)",
            all(r["method"] == "entropy" for r, _ in leaked),
        ),
        (
            "claims 2 and 3: the global bonus's leaks grow with V and T, and every seed leaked at 20,000, think",
            n(2000, "compact") <= n(2000, "think") <= n(20000, "think") and n(20000, "compact") <= n(20000, "think")
            and n(2000, "compact") <= n(20000, "compact") and n(20000, "think") == seeds_20kt,
        ),
        (
            "claim 2: at 2,000, think, the global bonus's seeds that did not leak end above PPO's tail-token share",
            all(e["tail_response_frac"] > row(2000, "think", "none")["per_seed"][s]["tail_response_frac"]
                for s, e in e2kt["per_seed"].items() if e["tail_response_frac"] < study.LEAK_FRAC),
        ),
        (
            "claim 4: the global bonus at 0.01 is not distinguishable from PPO at V <= 2,033 and compact horizons",
            all(same(ent(t, h)) for t, h in both if (t, h) != (20000, "think")),
        ),
        (
            "claim 4: the global bonus at 0.01 and 0.03 (tail 20,000, think) is below PPO, greedy < 1 % in every seed",
            all(dg(r)[1] < 0 and max(_seed_values(r, "greedy_accuracy")) < 0.01 for r in (ent(20000, "think"),
                                                                                            ent(20000, "think", 0.03))),
        ),
        (
            "claim 4: the leaked seed at 20,000, compact kept more than 10 % greedy accuracy",
            all(e["greedy_accuracy"] > 0.1 for e in ent(20000, "compact")["per_seed"].values()
                if e["tail_response_frac"] >= study.LEAK_FRAC),
        ),
        (
            "claim 4: TRE-K at the global bonus's effective weight is not distinguishable from PPO in every cell",
            all(same(trek(t, h)) for t, h in both),
        ),
        (
            "claim 4: TRE-K 0.01 and TRE-P 0.003 (tail 20,000, think) are below PPO",
            all(dg(r)[1] < 0 for r in (row(20000, "think", "tre-k", 0.01), row(20000, "think", "tre-p", 0.003))),
        ),
        (
            "claim 4: no regulariser beats PPO with a paired interval above 0",
            not any(dg(r)[0] > 0 for r in rows if r["delta"].get("greedy_accuracy")),
        ),
        (
            "claim 4: forking is below PPO (lower in every seed); KL-Cov is not distinguishable",
            dg(row(20000, "think", "forking"))[1] < 0
            and lower_every_seed(row(20000, "think", "forking"), row(20000, "think", "none"))
            and same(row(20000, "think", "kl-cov")),
        ),
    ]  # fmt: skip
    return [text for text, holds in statements if not holds]


_CELLS = [("0C", 0, "compact"), ("0T", 0, "think"), ("2KC", 2000, "compact"), ("2KT", 2000, "think"),
          ("20KC", 20000, "compact"), ("20KT", 20000, "think")]  # fmt: skip


def _replace_between(text: str, name: str, body: str) -> str:
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    if start not in text or end not in text:
        raise SystemExit(f"README.md has no {start} ... {end} block")
    head, rest = text.split(start, 1)
    return head + start + "\n" + body.strip("\n") + "\n" + end + rest.split(end, 1)[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", nargs="?", default=str(ROOT / "data" / "results" / "tail_leak"))
    ap.add_argument("--figures", help="also write the figures there (tre-edu study report --figures)")
    ap.add_argument("--readme", default=str(ROOT / "README.md"))
    args = ap.parse_args()
    rows = study.aggregate(study.load_results(args.results))
    readme = Path(args.readme)
    if args.figures:
        for path in study.save_figures(study.figures(rows), args.figures):
            print(f"wrote {path}")
    readme.write_text(_replace_between(readme.read_text(), "study-table", study.report(args.results)))
    print(f"rewrote the study table in {readme}")
    failed = _checks(rows)
    if failed:
        raise SystemExit(
            "the claims were NOT rewritten: the recorded numbers contradict these statements of the template; "
            "reread and edit CLAIMS (and _checks):\n  - " + "\n  - ".join(failed)
        )
    claims = CLAIMS
    for key, value in _numbers(rows).items():
        claims = claims.replace("{" + key + "}", value)
    missing = re.findall(r"\{[A-Z0-9_]+\}", claims)
    if missing:
        raise SystemExit(f"numbers missing from the template: {missing}")
    readme.write_text(_replace_between(readme.read_text(), "study-claims", claims))
    print(f"rewrote the claims in {readme}")


if __name__ == "__main__":
    main()
