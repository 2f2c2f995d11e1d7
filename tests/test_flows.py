"""The merge flow under Prefect's test harness (a real, temporary Prefect API)."""

import torch

from mergeflow.checkpoints import load_state_dict, save_state_dict
from mergeflow.statedict import mean
from mergeflow.storage import file_sha256


def test_merge_flow_fetches_from_s3_and_writes(prefect_harness, family, bucket, tmp_path):
    from flows.merge_checkpoints import merge_checkpoints_flow

    base, tuned = family
    uris = []
    for name, state in [("base", base)] + [(f"task{i}", s) for i, s in enumerate(tuned)]:
        uris.append(f"s3://{bucket}/{name}.safetensors")
        save_state_dict(state, uris[-1])
    out = tmp_path / "merged.safetensors"
    report = merge_checkpoints_flow(
        method="cart",
        base=uris[0],
        finetuned=uris[1:],
        out=str(out),
        params={"rank_ratio": 1.0},
        cache_dir=str(tmp_path / "cache"),
    )
    merged = load_state_dict(out)
    for key, value in mean(tuned).items():
        torch.testing.assert_close(merged[key], value, rtol=1e-5, atol=1e-6)
    assert set(report["sources"]) == set(uris)
    cached = next((tmp_path / "cache").rglob("task0.safetensors"))
    assert report["sources"][uris[1]] == file_sha256(cached)


def test_missing_checkpoint_is_not_retried(prefect_harness, bucket, tmp_path):
    from prefect import flow
    from prefect.client.orchestration import get_client

    from tasks.checkpoints import fetch_checkpoint

    @flow
    def fetch_one(uri: str) -> dict:
        state = fetch_checkpoint(uri, str(tmp_path), return_state=True)
        return {
            "failed": state.is_failed(),
            "message": state.message,
            "task_run_id": state.state_details.task_run_id,
        }

    outcome = fetch_one(f"s3://{bucket}/absent.safetensors")
    assert outcome["failed"]
    assert "absent.safetensors: no such file" in outcome["message"]
    with get_client(sync_client=True) as client:
        task_run = client.read_task_run(outcome["task_run_id"])
    assert task_run.run_count == 1
