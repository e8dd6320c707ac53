"""The symbolic MATH check in a separate process: ``python -m tre_edu.tasks.math_worker``.

:mod:`tre_edu.tasks.math` kills one that takes too long (sympy can hold the GIL for minutes on ``9^{9^{9}}``, so
no thread could stop it). Protocol: after its imports the worker writes ``ready``; then for every JSON line
``[answer, reference, timeout_s]`` it writes ``1`` (``math_verify.verify`` says equal) or ``0``.
"""

from __future__ import annotations

import json
import sys

from math_verify import parse, verify


def equal(answer: str, reference: str, timeout_s: int) -> bool:
    """``verify(parse($reference$), parse($answer$))``; math-verify's own alarm stops most slow cases early."""
    gold = parse(f"${reference}$", parsing_timeout=timeout_s)
    pred = parse(f"${answer}$", parsing_timeout=timeout_s)
    return bool(gold and pred and verify(gold, pred, timeout_seconds=timeout_s))


def serve(stdin=sys.stdin, stdout=sys.stdout) -> None:
    print("ready", file=stdout, flush=True)
    for line in stdin:
        try:
            answer, reference, timeout_s = json.loads(line)
            ok = equal(answer, reference, max(1, int(timeout_s)))
        except Exception:  # malformed request, sympy errors, math-verify's TimeoutException, RecursionError ...
            ok = False
        print("1" if ok else "0", file=stdout, flush=True)


if __name__ == "__main__":
    serve()
