"""Continual merging: folding checkpoints in one at a time ends where the one-shot methods
do, a failed fold changes nothing, and the model a record stands for is written like any
merge. On a tiny real open_clip tower."""

from __future__ import annotations

import pytest
import torch
from conftest import finetune_like, fold_all, merged_by, tiny_tower_state

from mergeflow.checkpoints import StateDictReader, load_state_dict
from mergeflow.continual import Arrival, ContinualModel, fold_in
from mergeflow.errors import CheckpointError, ParameterError, StateDictMismatchError
from mergeflow.merge import merge_readers, write_model
from mergeflow.outputs import Recipe
from mergeflow.storage import CheckpointCache


@pytest.fixture(scope="module")
def stream():
    base = tiny_tower_state(seed=31, width=32, layers=2)
    return base, finetune_like(base, num_tasks=4, seed=32)


def one_shot(method, base, finetuned, **params):
    readers = [StateDictReader(s, f"task{i}") for i, s in enumerate(finetuned)]
    return merge_readers(method, readers, StateDictReader(base, "base"), params, device="cpu")


@pytest.mark.parametrize(
    ("continual", "batch", "params", "batch_params"),
    [
        ("opcm", "opcm", {"alpha": 0.4}, {"alpha": 0.4}),
        ("average", "average", {}, {}),
        ("task_arithmetic", "task_arithmetic", {"scale": 0.3}, {"scale": 0.3}),
    ],
)
def test_folding_in_order_ends_where_the_one_shot_merge_does(
    stream, tmp_path, continual, batch, params, batch_params
):
    base, finetuned = stream
    record, running = fold_all(continual, base, finetuned, tmp_path, params)
    merged = merged_by(record, base, running)
    reference = one_shot(batch, base, finetuned, **batch_params)
    for key in base:
        torch.testing.assert_close(merged[key], reference[key], atol=2e-6, rtol=1e-5, msg=key)
    assert [a.task for a in record.arrivals] == ["task0", "task1", "task2", "task3"]
    assert len(record.task_norms) == 4 and all(n > 0 for n in record.task_norms)


def test_a_fold_that_fails_leaves_the_state_as_it_was(stream, tmp_path):
    base, finetuned = stream
    record, running = fold_all("opcm", base, finetuned[:2], tmp_path)
    before = (tmp_path / "running-1.safetensors").read_bytes()
    broken = dict(finetuned[2])
    last = list(broken)[-1]
    broken[last] = broken[last].clone()
    broken[last].view(-1)[0] = float("nan")
    out = tmp_path / "running-2.safetensors"
    arrival = Arrival(uri="broken", sha256="f" * 64)
    with pytest.raises(CheckpointError, match=f"broken: key '{last}' holds 1 NaN"):
        fold_in(record, StateDictReader(base, "base"), StateDictReader(broken, "broken"),
                arrival, str(out), running)  # fmt: skip
    assert not out.exists() and (tmp_path / "running-1.safetensors").read_bytes() == before
    assert len(record.arrivals) == 2


def test_an_arrival_of_another_shape_or_folded_twice_is_refused(stream, tmp_path):
    base, finetuned = stream
    record, running = fold_all("average", base, finetuned[:1], tmp_path)
    key = "visual.transformer.resblocks.1.attn.out_proj.weight"
    other = {**finetuned[1], key: torch.zeros(8, 8)}
    arrival = Arrival(uri="other", sha256="e" * 64)
    with pytest.raises(StateDictMismatchError, match=key.replace(".", r"\.")):
        fold_in(record, StateDictReader(base, "base"), StateDictReader(other, "other"),
                arrival, str(tmp_path / "x.safetensors"), running)  # fmt: skip
    again = Arrival(uri="task0-copy", sha256=record.arrivals[0].sha256)
    with pytest.raises(ParameterError, match="task0-copy: already folded in"):
        fold_in(record, StateDictReader(base, "base"), StateDictReader(finetuned[0], "again"),
                again, str(tmp_path / "y.safetensors"), running)  # fmt: skip


def test_the_model_a_record_stands_for_is_written_like_a_merge(stream, tmp_path):
    base, finetuned = stream
    record, running = fold_all("opcm", base, finetuned[:3], tmp_path)
    out = tmp_path / "merged.safetensors"
    model = ContinualModel(record, StateDictReader(base, "base"), running)
    sources = [(a.uri, a.sha256) for a in record.arrivals]
    recipe = Recipe("opcm", record.params, ("base", "0" * 64), sources)
    write_model(model, out, recipe, StateDictReader(base, "base"), CheckpointCache(tmp_path / "c"))
    written = load_state_dict(out)
    expected = one_shot("opcm", base, finetuned[:3])
    assert written.keys() == base.keys()
    for key in base:
        assert written[key].dtype == base[key].dtype
        torch.testing.assert_close(written[key], expected[key], atol=2e-6, rtol=1e-5, msg=key)
