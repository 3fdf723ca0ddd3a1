"""Run tests N times in a row beside busy loops (the flaky-test check of the kill/signal/server tests):
``python tools/under_load.py -n 20 --busy 2 tests/test_serve.py::test_x tests/test_reliability.py -k kill``.
Prints each round's outcome and the count; exit status 1 when any round failed."""

from __future__ import annotations

import argparse
import multiprocessing as mp
import subprocess
import sys
import time


def _spin() -> None:
    while True:
        pass


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", type=int, default=20, help="rounds")
    ap.add_argument("--busy", type=int, default=2, help="busy loops beside the tests")
    ap.add_argument("pytest_args", nargs=argparse.REMAINDER, help="what pytest runs")
    a = ap.parse_args()
    loops = [mp.Process(target=_spin, daemon=True) for _ in range(a.busy)]
    for p in loops:
        p.start()
    passed = 0
    try:
        for i in range(1, a.n + 1):
            t0 = time.monotonic()
            r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *a.pytest_args],
                               capture_output=True, text=True)
            ok = r.returncode == 0
            passed += ok
            tail = r.stdout.strip().splitlines()[-1] if r.stdout.strip() else ""
            print(f"round {i}/{a.n}: {'ok' if ok else 'FAILED'} in {time.monotonic() - t0:.0f} s — {tail}", flush=True)
            if not ok:
                print(r.stdout[-4000:], r.stderr[-2000:], sep="\n", flush=True)
    finally:
        for p in loops:
            p.terminate()
    print(f"{passed}/{a.n} rounds passed beside {a.busy} busy loops")
    return 0 if passed == a.n else 1


if __name__ == "__main__":
    sys.exit(main())
