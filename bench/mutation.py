"""Mutation testing of the core (`make mutation`): how many planted bugs the fast tests catch.

mutmut (configured in pyproject.toml, [tool.mutmut]) writes a mutated copy of every function
of the listed modules into ``mutants/`` and runs, for each mutant, the fast tests that cover
that function. This script runs it (or, with ``--report``, only reads what an earlier run
left) and prints, per module, the mutants killed (a test failed), timed out (the tests hung
or crawled: counted as caught), survived (every test passed) and not run, the kill rate, and
each survivor's diff.

Target: at least 90% caught in each module; a survivor is either killed by a new test or
named in the README with the reason it is equivalent (the same behaviour as the original).

    python bench/mutation.py             # run mutmut afresh (hours on 2 cores), then report
    python bench/mutation.py "mergeflow.svd*" "mergeflow.methods.ties*"   # some functions
    python bench/mutation.py --report    # report on the last run
    python bench/mutation.py --report --diffs 0
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TARGET = 0.90


def statuses() -> dict:
    """mutmut's own reading of a mutant's exit code (killed, timeout, survived, ...)."""
    os.chdir(ROOT)  # mutmut reads its configuration from the working directory
    from mutmut.stats import status_by_exit_code

    return status_by_exit_code


def outcome(status: str) -> str:
    """The four columns: caught as mutmut scores it (killed, timed out), survived (every
    test passed, or no test covers it), not run, other (suspicious, skipped)."""
    if status in ("killed", "caught by type check"):
        return "killed"
    if status == "timeout":
        return "timeout"
    if status in ("survived", "no tests"):
        return "survived"
    if status == "not checked":
        return "not run"
    return "other"


def read_results(mutants: Path) -> dict[str, Counter]:
    status_of = statuses()
    by_module: dict[str, Counter] = defaultdict(Counter)
    survivors: dict[str, list[str]] = defaultdict(list)
    for meta in sorted(mutants.rglob("*.py.meta")):
        module = str(meta.relative_to(mutants)).removesuffix(".meta")
        codes = json.loads(meta.read_text()).get("exit_code_by_key", {})
        for name, code in codes.items():
            word = outcome(status_of[code])
            by_module[module][word] += 1
            if word == "survived":
                survivors[module].append(name)
    return by_module, survivors


def show(name: str) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "mutmut", "show", name],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    return result.stdout.strip()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--report", action="store_true", help="only report the last run")
    parser.add_argument("--diffs", type=int, default=40, help="survivors' diffs to print")
    parser.add_argument("--max-children", type=int, default=os.cpu_count() or 2)
    parser.add_argument("names", nargs="*", help="mutant name globs (default: every mutant)")
    args = parser.parse_args()
    if not args.report:
        # mutmut keeps mutants of files it saw unchanged, even when its configuration
        # changed which files to mutate: every run starts from a fresh copy
        shutil.rmtree(ROOT / "mutants", ignore_errors=True)
        started = time.perf_counter()
        subprocess.run(
            [sys.executable, "-m", "mutmut", "run", "--max-children", str(args.max_children)]
            + args.names,
            cwd=ROOT,
            check=False,
            stdout=subprocess.DEVNULL,
        )
        print(f"mutmut run: {time.perf_counter() - started:.0f} s")
    by_module, survivors = read_results(ROOT / "mutants")
    if not by_module:
        print("no results: run without --report first")
        return 1
    print(
        f"{'module':34s} {'mutants':>7s} {'killed':>7s} {'timeout':>7s} {'survived':>8s} "
        f"{'other':>6s} {'not run':>7s} {'caught':>7s}"
    )
    below = []
    for module, counts in sorted(by_module.items()):
        total = sum(counts.values())
        caught = counts["killed"] + counts["timeout"]
        ran = total - counts["not run"]
        rate = caught / ran if ran else 0.0
        if rate < TARGET:
            below.append(module)
        print(
            f"{module:34s} {total:7d} {counts['killed']:7d} {counts['timeout']:7d} "
            f"{counts['survived']:8d} {counts['other']:6d} {counts['not run']:7d} {rate:7.1%}"
        )
    print(f"target {TARGET:.0%} caught per module; below it: {', '.join(below) or 'none'}")
    shown = 0
    for _module, names in sorted(survivors.items()):
        for name in names:
            if shown >= args.diffs:
                remaining = sum(len(v) for v in survivors.values()) - shown
                print(f"... and {remaining} more survivors (mutmut results)")
                return 0
            print(f"\n--- survived: {name}\n{show(name)}")
            shown += 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
