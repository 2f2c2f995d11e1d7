"""The example specs users start from parse and point where they should (they need the real
checkpoints and datasets, so they are validated here, not run)."""

import re
from pathlib import Path

import pytest

from mergeflow.sources import _HUB
from mergeflow.spec import MergeSpec

EXAMPLES = sorted((Path(__file__).resolve().parent.parent / "examples").glob("*.yaml"))
PAPER_TASKS = ["sun397", "stanford_cars", "resisc45", "eurosat", "svhn", "gtsrb", "mnist", "dtd"]
# class counts of the tasks whose names the specs list (SUN397's and Stanford Cars' come
# from the hub datasets' own labels)
CLASS_COUNTS = {"resisc45": 45, "eurosat": 10, "svhn": 10, "gtsrb": 43, "mnist": 10, "dtd": 47}


def test_there_are_both_examples():
    assert [p.name for p in EXAMPLES] == [
        "cart-vit-b-32-8-tasks.yaml",
        "fusion-bench-clip-vit-b-32-8-tasks.yaml",
    ]


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_example_spec_is_the_papers_benchmark(path):
    spec = MergeSpec.from_yaml(path)
    assert [t.name for t in spec.tasks] == PAPER_TASKS
    checkpoint = re.compile(r"^(s3://[a-z0-9][a-z0-9.-]+/\S+\.pt|hf://\S+)$")
    for uri in [spec.base] + [t.checkpoint for t in spec.tasks]:
        assert checkpoint.match(uri), uri
        if uri.startswith("hf://"):
            assert _HUB.match(uri), uri
    for task in spec.tasks:
        assert re.fullmatch(r"[\w.-]+/[\w.-]+", task.dataset.uri), task.dataset.uri
        assert task.dataset.format == "hub"
        assert task.templates and all("{c}" in t for t in task.templates)
        if task.name in CLASS_COUNTS:
            assert len(task.classes) == CLASS_COUNTS[task.name], task.name
        else:
            assert task.classes is None  # named by the dataset's labels
    assert 0.12 in spec.grid.rank_ratios and 1.0 in spec.grid.scales
    assert {"finetuned", "zeroshot", "average"} <= {b for b in spec.baselines if isinstance(b, str)}
