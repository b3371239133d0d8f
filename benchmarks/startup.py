"""CLI start-up: wall time of `llmkit --help` and `llmkit SUB --help` against bare `python -c pass`.

Target (SPEC §7): under 0.3 s each. Prints the best of 5 runs and the ratio to the interpreter's
own start-up, both measured in this run.
"""

from __future__ import annotations

import subprocess
import sys
import time


def best_of(cmd: list[str], n: int = 5) -> float:
    times = []
    for _ in range(n):
        t = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True)
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    base = best_of([sys.executable, "-c", "pass"])
    print(f"{'command':<28} {'seconds':>8} {'x python':>9}  target < 0.3 s")
    print(f"{'python -c pass':<28} {base:8.3f} {1.0:9.2f}")
    worst = 0.0
    for sub in ([], ["prepare"], ["train"], ["generate"], ["eval"]):
        t = best_of([sys.executable, "-m", "llmkit", *sub, "--help"])
        worst = max(worst, t)
        label = "llmkit " + " ".join([*sub, "--help"])
        print(f"{label:<28} {t:8.3f} {t / base:9.2f}  {'ok' if t < 0.3 else 'SLOW'}")
    print(f"worst: {worst:.3f} s")


if __name__ == "__main__":
    main()
