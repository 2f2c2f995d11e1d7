"""Promotion by hand: score a registered version and the champion on a spec's report data
and move ``champion`` only when the version beats it.

mergeflow promote SPEC.yaml [--version N]      (default: the version holding ``challenger``)
"""

from __future__ import annotations

from prefect import flow

from mergeflow.spec import MergeSpec
from mergeflow.tracking import score_of
from tasks.pipeline import prepare_evaluation, resolve_inputs, score_registered_model
from tasks.registry import move_champion, resolve_version


@flow(name="promote", log_prints=True)
def promote(
    spec: MergeSpec,
    version: str | None = None,
    model_name: str | None = None,
    cache_dir: str | None = None,
) -> dict:
    """Give ``champion`` to ``version`` if it scores higher than the champion on the same
    report data (both are scored now, by this run); otherwise change nothing.

    Args:
        spec: the spec whose tasks' report splits decide.
        version: the version to consider, a number or an alias (default: challenger).
        model_name: the registered model (default: the spec's registered_model).
        cache_dir: local cache folder.
    """
    name = model_name or spec.registered_model
    candidate = resolve_version(name, version or "challenger")
    champion = resolve_version(name, "champion", missing_ok=True)
    inputs = resolve_inputs(spec, cache_dir)
    prepare_evaluation(inputs)
    candidate_summary = score_registered_model(inputs, f"models:/{name}/{candidate}")
    result = {
        "name": name,
        "version": candidate,
        "score": score_of(candidate_summary),
        "previous_champion": champion,
    }
    if champion == candidate:
        print(f"version {candidate} of {name} already holds champion")
        return {**result, "champion_score": result["score"], "promoted": False}
    champion_score = float("-inf")
    if champion is not None:
        champion_summary = score_registered_model(inputs, f"models:/{name}/{champion}")
        champion_score = score_of(champion_summary)
    promoted = move_champion(name, candidate, result["score"], champion_score)
    verdict = "is the new champion" if promoted else "stays behind the champion"
    print(
        f"version {candidate} of {name} {verdict}: {result['score']:.4f} against "
        f"{champion_score:.4f} on the report splits"
    )
    return {**result, "champion_score": champion_score, "promoted": promoted}


def run_from_cli(
    spec_path: str,
    version: str | None = None,
    model_name: str | None = None,
    cache_dir: str | None = None,
) -> dict:
    """Entry point for ``mergeflow promote``."""
    return promote(MergeSpec.from_yaml(spec_path), version, model_name, cache_dir)
