"""Mutation testing of the core (`make mutation`): how many planted bugs the fast tests catch.

mutmut (configured in pyproject.toml, [tool.mutmut]) writes a mutated copy of every function
of the listed modules into ``mutants/`` and runs, for each mutant of the core's scope (below),
the fast tests that cover that function. This script runs it (or, with ``--report``, only
reads what an earlier run left) and prints, per module, the mutants killed (a test failed),
timed out (the tests hung or crawled: counted as caught), survived (every test passed),
equivalent (survivors listed in ``EQUIVALENT`` with the reason they behave as the original)
and not run, the share caught of those that are not equivalent, and each other survivor's
diff.

The scope is the one the project holds to the target: the merge methods, CART's kernel, the
CART grid, the SVD helpers, the state-dict algebra, the streamed order statistics, the
registry's champion gate and the cache's verification in storage.py. Calls to the loggers
and to tqdm are not mutated (pyproject.toml: what the core logs is for people, not tests).

Target: at least 90% caught in each module; every survivor either killed by a new test or
listed in ``EQUIVALENT`` with its reason.

    python bench/mutation.py             # run mutmut over the scope (~18 min on 2 cores)
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
    "mergeflow.kernels.*",
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
BROADCAST = "keepdim only changes a shape that broadcasting makes the same"


def _each(prefix: str, numbers: str, reason: str) -> dict[str, str]:
    return {f"mergeflow.{prefix}__mutmut_{n}": reason for n in numbers.split()}


EQUIVALENT: dict[str, str] = {
    **_each("cart_grid.xǁCartFactorsǁfactorize", "22 23 37 62", CPU_ONLY),
    **_each("cart_grid.xǁCartFactorsǁmerge", "14 15 32 41", CPU_ONLY),
    **_each("methods.task_vectors.x_random_drop", "23", CPU_ONLY),
    **_each("methods.pcb.x__column", "10 13", CPU_ONLY),
    **_each("svd.x_resolve_device", "9 11 12 27 28", CPU_ONLY),
    **_each("svd.xǁFactorsǁto", "7 8 9", CPU_ONLY),
    **_each("cart_grid.xǁCartFactorsǁenergy_ranks", "10 13 14", STRICT_ZIP),
    **_each("kernels.cart.x_energy_ranks", "9 12 13", STRICT_ZIP),
    **_each("kernels.cart.x_kept_ranks", "21 24 31", STRICT_ZIP),
    **_each("methods.task_vectors.x_magnitude_trim", "5 8 9", STRICT_ZIP),
    **_each("order_stats.xǁOrderStatisticsǁobserve", "20 23 24", STRICT_ZIP),
    **_each("order_stats.xǁOrderStatisticsǁvalues", "10 14 15", STRICT_ZIP),
    **_each("order_stats.x_per_task_order_statistics", "8 11 12", STRICT_ZIP),
    **_each("svd.x_low_rank_sum", "12 15 16 26 29 30 40 43 44", STRICT_ZIP),
    **_each("methods.cart.x_merge_tensor", "8 10 12 20", SLICED_LATER),
    **_each("kernels.cart.x_factorize_task_vector", "12", SLICED_LATER),
    **_each("methods.iso.x_isotropic_common_and_specific", "19 24 34 35", SLICED_LATER),
    **_each("svd.x_truncated_svd", "11 12 23 24", SLICED_LATER),
    **_each("methods.iso.x_isotropic_common_and_specific", "52", SAME_DEFAULT),
    **_each("methods.tsv.x_merge_task_singular_vectors", "27", SAME_DEFAULT),
    **_each("methods.pcb.x__column", "9 12", SAME_DEFAULT),
    **_each("svd.x_low_rank_sum", "36", SAME_DEFAULT),
    **_each("storage.xǁCheckpointCacheǁ_download", "30", SAME_DEFAULT),
    **_each("methods.pcb.x__competition", "31 33", BROADCAST),
    **_each(
        "cart_grid.xǁCartFactorsǁmerge",
        "8",
        "the grid point's scale is validated as a number only: 1.0 passes where it passes",
    ),
    **_each(
        "methods.base.xǁDescribedǁparse_params",
        "13 14",
        "no method's parameters have a whole-model rule: an error always names its field",
    ),
    **_each(
        "cart_grid.xǁCartFactorsǁfactorize",
        "53 56",
        "θ_avg computed again by the kernel: the same tensor",
    ),
    **_each(
        "methods.cart.x_merge_tensor",
        "21 24",
        "θ_avg computed again by the kernel: the same tensor",
    ),
    **_each(
        "kernels.cart.x_factorize_centered",
        "3",
        "θ_avg computed again by the kernel: the same tensor",
    ),
    **_each(
        "kernels.cart.x_kept_ranks",
        "7 9",
        "every task vector of a key has one shape",
    ),
    **_each(
        "kernels.cart.x_factorize_task_vector",
        "23 26",
        "the whole spectrum's Σs² is ‖τ̄‖² up to rounding",
    ),
    **_each(
        "methods.dare.x_merge_tensor",
        "19 26 27",
        "elect_and_merge takes every aggregate but 'sum' as the mean",
    ),
    **_each(
        "methods.iso.x_isotropic_common_and_specific",
        "4",
        "every task vector of a key has one shape",
    ),
    **_each(
        "methods.tsv.x_merge_task_singular_vectors",
        "9",
        "every task vector of a key has one shape",
    ),
    **_each(
        "methods.pcb.x_prepare",
        "23",
        "differs only on a model of fewer than 4 entries (clip < 0.5)",
    ),
    **_each(
        "methods.pcb.x_prepare",
        "58",
        "differs only at ratio 0, which the parameters refuse",
    ),
    **_each(
        "methods.task_vectors.x__generator_seed",
        "8 12 13 14",
        "torch's CPU generator (mt19937) keeps the low 32 bits of a seed",
    ),
    **_each(
        "methods.task_vectors.x_random_drop",
        "3",
        "p = 1 is refused by the parameters; at p = 0 the drop keeps every entry anyway",
    ),
    **_each(
        "methods.task_vectors.x_random_drop",
        "20",
        "a uniform draw exactly equal to p (about 2⁻²⁴ per entry)",
    ),
    **_each(
        "methods.task_vectors.x_elect_and_merge",
        "15 16 22",
        "only the sign of the elected value is used",
    ),
    **_each(
        "methods.task_vectors.x_trim_thresholds",
        "1 2",
        "at density 1 the threshold is the smallest magnitude, which keeps every entry "
        "(the same merge, two passes slower)",
    ),
    **_each(
        "order_stats.xǁOrderStatisticsǁ__init__",
        "1",
        "ranks is set by next_pass before anything reads it",
    ),
    **_each(
        "order_stats.x_per_task_order_statistics",
        "1 3",
        "None is as empty as [] to `if not stats`; only pass 1 is told apart by number",
    ),
    **_each(
        "order_stats.xǁOrderStatisticsǁnext_pass",
        "31 35",
        "bucket 0 holds only negative NaNs, which callers refuse",
    ),
    **_each(
        "statedict.x__combine",
        "8",
        "torch's CPU arithmetic on half-precision tensors runs in float32 and rounds once",
    ),
    **_each(
        "storage.x_file_sha256",
        "13",
        "reads the file in one piece instead of chunks: the same digest",
    ),
    **_each("storage.x__etag_of", "13", "also strips X, which no (hexadecimal) ETag holds"),
    **_each(
        "storage.xǁCheckpointCacheǁ_download",
        "12 14",
        "the partial file in the system's temporary folder: the same where that shares a "
        "filesystem with the cache (here); elsewhere the rename fails loudly",
    ),
    **_each("storage.xǁCheckpointCacheǁ_download", "13 15 16 17", "the partial file's name"),
    **_each(
        "storage.xǁCheckpointCacheǁ_download",
        "75 76 77 78",
        "entry.json's uri and etag are for people: nothing reads them back",
    ),
    **_each(
        "svd.x_energy_rank",
        "9",
        "a zero total gives rank 1 either way (every cumulative sum reaches 0)",
    ),
    **_each(
        "svd.x_energy_rank",
        "18",
        "the 1e-12 slack under the target leaves ≥ and > apart only on exact ties",
    ),
    **_each(
        "svd.x_truncated_svd",
        "6",
        "a square matrix through its transpose: the same best rank-k approximation",
    ),
}


# Survivors that do behave differently, left untested with the reason: they count against
# the module's share and are listed, not shown as diffs.
UNTESTED: dict[str, str] = {
    **_each(
        "methods.pcb.x_prepare",
        "59",
        "differs only at ratio ≤ 1/d, where a task keeps less than one entry (both versions "
        "give a degenerate merge)",
    ),
}


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
    reasons: Counter = Counter()
    listed: list[str] = []
    for meta in sorted(mutants.rglob("*.py.meta")):
        module = str(meta.relative_to(mutants)).removesuffix(".meta")
        codes = json.loads(meta.read_text()).get("exit_code_by_key", {})
        for name, code in codes.items():
            if not in_scope(name):
                continue
            word = outcome(status_of[code])
            if (name in EQUIVALENT or name in UNTESTED) and word in ("killed", "timeout"):
                stale.append(name)
            elif name in EQUIVALENT and word == "survived":
                word = "equivalent"
                reasons[EQUIVALENT[name]] += 1
            by_module[module][word] += 1
            if word == "survived" and name in UNTESTED:
                listed.append(name)
            elif word == "survived":
                survivors[module].append(name)
    return by_module, survivors, stale, reasons, listed


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
        else:
            # which tests cover which function is cached from the last run: a new test or
            # a new function would go unseen (its mutants "survive" with no test run)
            (ROOT / "mutants" / "mutmut-stats.json").unlink(missing_ok=True)
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
    by_module, survivors, stale, reasons, listed = read_results(ROOT / "mutants")
    if not by_module:
        print("no results: run without --report first")
        return 1
    columns = ("killed", "timeout", "survived", "equivalent", "other", "not run")
    print(f"{'module':34s} {'mutants':>7s} " + " ".join(f"{c:>10s}" for c in columns) + "  caught")
    below, unjudged = [], []
    for module, counts in sorted(by_module.items()):
        total = sum(counts.values())
        caught = counts["killed"] + counts["timeout"]
        counted = total - counts["not run"] - counts["equivalent"]
        cells = " ".join(f"{counts[c]:10d}" for c in columns)
        if counts["not run"] and not counted:
            unjudged.append(module)  # nothing to judge it by yet (a run of other functions)
            continue
        rate = caught / counted if counted else 1.0
        if rate < TARGET:
            below.append(module)
        print(f"{module:34s} {total:7d} {cells} {rate:7.1%}")
    print(f"target {TARGET:.0%} caught per module; below it: {', '.join(below) or 'none'}")
    if unjudged:
        print(f"no mutant run yet (not judged): {', '.join(unjudged)}")
    if reasons:
        print(f"equivalent survivors ({sum(reasons.values())}), by reason:")
        for reason, count in reasons.most_common():
            print(f"  {count:3d}  {reason}")
    for name in listed:
        print(f"survivor listed as untested: {name}: {UNTESTED[name]}")
    for name in stale:
        print(f"listed as a survivor but caught now (remove it from the list): {name}")
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
