"""Mutation testing of the core (`make mutation`): how many planted bugs the fast tests catch.

mutmut (configured in pyproject.toml, [tool.mutmut]) writes a mutated copy of every function
of the listed modules into ``mutants/`` and runs, for each mutant of the core's scope (below),
the fast tests that cover that function. This script runs it (or, with ``--report``, only
reads what an earlier run left) and prints, per module, the mutants killed (a test failed),
timed out (the tests hung or crawled: counted as caught), survived (every test passed),
equivalent (survivors listed in ``EQUIVALENT`` with the reason they behave as the original)
and not run, the share caught of those that are not equivalent, and each other survivor's
diff.

The scope is the one the project holds to the target: the merge methods, the CART grid, the
SVD helpers, the state-dict algebra, the streamed order statistics, the registry's champion
gate and the cache's verification in storage.py. Calls to the loggers and to tqdm are not
mutated (pyproject.toml: what the core logs is for people, not for tests).

Target: at least 90% caught in each module; every survivor either killed by a new test or
listed in ``EQUIVALENT`` with its reason.

    python bench/mutation.py             # run mutmut over the scope (~25 min on 2 cores)
    python bench/mutation.py "mergeflow.svd*" "mergeflow.methods.ties*"   # some functions
    python bench/mutation.py --report    # report on the last run
    python bench/mutation.py --report --diffs 0
"""

from __future__ import annotations

import argparse
import fnmatch
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

SCOPE = (
    "mergeflow.methods.*",
    "mergeflow.cart_grid.*",
    "mergeflow.svd.*",
    "mergeflow.statedict.*",
    "mergeflow.order_stats.*",
    # the registry's gate: who is champion, when aliases move
    "mergeflow.registry.x_current_champion__*",
    "mergeflow.registry.x__move_aliases__*",
    "mergeflow.registry.x_promote__*",
    # the cache's verification: digests, fingerprints, ETags, what a cached entry must hold
    "mergeflow.storage.x_fingerprint__*",
    "mergeflow.storage.x_file_sha256__*",
    "mergeflow.storage.xǁLocalCopyǁdigest__*",
    "mergeflow.storage.x__etag_of__*",
    "mergeflow.storage.x__etag_is_not_an_md5__*",
    "mergeflow.storage.xǁCheckpointCacheǁfetch__*",
    "mergeflow.storage.xǁCheckpointCacheǁ_valid_entry__*",
    "mergeflow.storage.xǁCheckpointCacheǁ_download__*",
)

# Survivors that behave as the original, by name (mutmut numbers a function's mutants in a
# fixed order, so a name stays valid while its function is unchanged; the report flags an
# entry that no longer survives). The reasons, once each:
CPU_ONLY = "a device argument: the same on a machine without CUDA (the CUDA tests skip here)"
STRICT_ZIP = "zip's strict=: the sequences have one length by construction"
SLICED_LATER = "computes more singular triplets or full matrices; the caller slices to k"
SAME_DEFAULT = "an argument equal to the callee's default (cat's dim 0, the same dtype)"
EQUIVALENT: dict[str, str] = {}


def in_scope(name: str) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in SCOPE)


def statuses() -> dict:
    """mutmut's own reading of a mutant's exit code (killed, timeout, survived, ...)."""
    os.chdir(ROOT)  # mutmut reads its configuration from the working directory
    from mutmut.stats import status_by_exit_code

    return status_by_exit_code


def outcome(status: str) -> str:
    """The columns: caught as mutmut scores it (killed, timed out), survived (every test
    passed, or no test covers it), not run, other (suspicious, skipped)."""
    if status in ("killed", "caught by type check"):
        return "killed"
    if status == "timeout":
        return "timeout"
    if status in ("survived", "no tests"):
        return "survived"
    if status == "not checked":
        return "not run"
    return "other"


def read_results(mutants: Path):
    status_of = statuses()
    by_module: dict[str, Counter] = defaultdict(Counter)
    survivors: dict[str, list[str]] = defaultdict(list)
    stale: list[str] = []
    for meta in sorted(mutants.rglob("*.py.meta")):
        module = str(meta.relative_to(mutants)).removesuffix(".meta")
        codes = json.loads(meta.read_text()).get("exit_code_by_key", {})
        for name, code in codes.items():
            if not in_scope(name):
                continue
            word = outcome(status_of[code])
            if name in EQUIVALENT:
                if word == "survived":
                    word = "equivalent"
                elif word in ("killed", "timeout"):
                    stale.append(name)
            by_module[module][word] += 1
            if word == "survived":
                survivors[module].append(name)
    return by_module, survivors, stale


def show(name: str, module: str) -> str:
    """The survivor's diff against the original source, as ``mutmut show`` prints it."""
    from mutmut.__main__ import get_diff_for_mutant

    return get_diff_for_mutant(name, path=Path(module)).strip()  # relative: mutants/ + path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--report", action="store_true", help="only report the last run")
    parser.add_argument("--diffs", type=int, default=40, help="survivors' diffs to print")
    parser.add_argument("--max-children", type=int, default=os.cpu_count() or 2)
    parser.add_argument("names", nargs="*", help="mutant name globs (default: the scope)")
    args = parser.parse_args()
    if not args.report:
        if not args.names:
            # mutmut keeps the mutants of files it saw unchanged, even of files its
            # configuration no longer names: a whole run starts from a fresh copy
            shutil.rmtree(ROOT / "mutants", ignore_errors=True)
        started = time.perf_counter()
        # mutmut forks a worker per mutant: an OpenMP pool started before the fork deadlocks
        # the child's first parallel torch op (it then "times out", a false kill)
        threads = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        subprocess.run(
            [sys.executable, "-m", "mutmut", "run", "--max-children", str(args.max_children)]
            + list(args.names or SCOPE),
            cwd=ROOT,
            env={**os.environ, **threads},
            check=False,
            stdout=subprocess.DEVNULL,
        )
        print(f"mutmut run: {time.perf_counter() - started:.0f} s")
    by_module, survivors, stale = read_results(ROOT / "mutants")
    if not by_module:
        print("no results: run without --report first")
        return 1
    columns = ("killed", "timeout", "survived", "equivalent", "other", "not run")
    print(f"{'module':34s} {'mutants':>7s} " + " ".join(f"{c:>10s}" for c in columns) + "  caught")
    below = []
    for module, counts in sorted(by_module.items()):
        total = sum(counts.values())
        caught = counts["killed"] + counts["timeout"]
        counted = total - counts["not run"] - counts["equivalent"]
        rate = caught / counted if counted else 1.0
        if rate < TARGET:
            below.append(module)
        cells = " ".join(f"{counts[c]:10d}" for c in columns)
        print(f"{module:34s} {total:7d} {cells} {rate:7.1%}")
    print(f"target {TARGET:.0%} caught per module; below it: {', '.join(below) or 'none'}")
    for name in stale:
        print(f"listed as equivalent but caught now (remove it from EQUIVALENT): {name}")
    shown = 0
    for module, names in sorted(survivors.items()):
        for name in names:
            if shown >= args.diffs:
                remaining = sum(len(v) for v in survivors.values()) - shown
                print(f"... and {remaining} more survivors (mutmut results)")
                return 0
            print(f"\n--- survived: {name}\n{show(name, module)}")
            shown += 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
