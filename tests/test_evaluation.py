"""Heads, prepared splits and scoring on a tiny real open_clip model and real parquet data."""

import pytest
import torch

from mergeflow import ParameterError
from mergeflow.evaluation import REPORT, SELECTION, accuracy, prepare_task, summarize
from mergeflow.models import classify, create_model, image_transform, tokenizer_for, zero_shot_head
from mergeflow.spec import DatasetSpec, TaskSpec
from mergeflow.storage import CheckpointCache
from zoo import sources
from zoo.build import split_indices, write_split

CONFIG = "mergeflow-tiny-vit"


@pytest.fixture(scope="module")
def shapes_dir(tmp_path_factory):
    task = sources.shapes(per_class=12)
    folder = tmp_path_factory.mktemp("shapes")
    for split, idx in split_indices(len(task.labels), test=24, validation=18).items():
        write_split(task, idx, folder / f"{split}.parquet")
    return task, folder


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return create_model(CONFIG)


def test_zero_shot_head_is_the_normalized_mean_of_prompt_embeddings(model):
    tokenizer = tokenizer_for(CONFIG)
    templates = ("a {c}.", "a drawing of a {c}.")
    head = zero_shot_head(model, tokenizer, ("circle", "square"), templates)
    assert head.shape == (2, 64) and head.dtype == torch.float32
    torch.testing.assert_close(head.norm(dim=1), torch.ones(2))
    with torch.no_grad():
        emb = model.encode_text(tokenizer(["a square.", "a drawing of a square."]))
    emb = emb / emb.norm(dim=1, keepdim=True)
    torch.testing.assert_close(head[1], emb.mean(0) / emb.mean(0).norm())


def test_prepare_and_score(shapes_dir, model, tmp_path, monkeypatch):
    task_data, folder = shapes_dir
    spec = TaskSpec(
        name="shapes",
        checkpoint="unused",
        dataset=DatasetSpec(uri=str(folder)),
        templates=("a drawing of a {c}.",),
    )
    cache = CheckpointCache(tmp_path / "cache")
    prepared = prepare_task(spec, model, tokenizer_for(CONFIG), cache)
    assert prepared.classes == sources.SHAPES  # read from the parquet ClassLabel
    assert prepared.splits[SELECTION].images.shape == (18, 3, 32, 32)
    assert prepared.splits[REPORT].labels.shape == (24,)

    # scoring equals a direct forward pass through the model with the same head
    images = prepared.splits[REPORT].images
    expected = (
        (classify(model, prepared.head, images).argmax(1) == prepared.splits[REPORT].labels)
        .float()
        .mean()
        .item()
    )
    assert accuracy(model, prepared, REPORT, batch_size=7, device="cpu") == pytest.approx(expected)

    # preprocessing matches open_clip's own transform on the decoded image
    from datasets import Dataset

    first = Dataset.from_parquet(str(folder / "validation.parquet"))[0]["image"]
    torch.testing.assert_close(prepared.splits[SELECTION].images[0], image_transform(model)(first))

    # a second preparation decodes nothing: it reads the cached tensors
    import mergeflow.evaluation as evaluation

    def no_transform(*args, **kwargs):
        raise AssertionError("decoded again")

    monkeypatch.setattr(evaluation, "image_transform", lambda m: no_transform)
    again = prepare_task(spec, model, tokenizer_for(CONFIG), cache)
    assert torch.equal(again.splits[REPORT].images, images)


def test_class_count_must_cover_labels(shapes_dir, model, tmp_path):
    _, folder = shapes_dir
    spec = TaskSpec(
        name="shapes",
        checkpoint="x",
        dataset=DatasetSpec(uri=str(folder)),
        classes=("circle", "square"),
    )
    with pytest.raises(ParameterError, match=r"task 'shapes': 2 class names but .* label 5"):
        prepare_task(spec, model, tokenizer_for(CONFIG), CheckpointCache(tmp_path))


def test_missing_split_is_named(shapes_dir, model, tmp_path):
    _, folder = shapes_dir
    spec = TaskSpec(
        name="shapes", checkpoint="x", dataset=DatasetSpec(uri=str(folder), report_split="holdout")
    )
    with pytest.raises(ParameterError, match=r"holdout\.parquet"):
        prepare_task(spec, model, tokenizer_for(CONFIG), CheckpointCache(tmp_path))


def test_summary_normalizes_by_the_finetuned_model():
    summary = summarize({"a": 0.5, "b": 0.9}, {"a": 1.0, "b": 0.9})
    assert summary["normalized"] == {"a": 0.5, "b": 1.0}
    assert summary["mean_accuracy"] == pytest.approx(0.7)
    assert summary["mean_normalized"] == pytest.approx(0.75)


def test_imagefolder_datasets_are_read_with_their_folder_labels(model, tmp_path):
    from PIL import Image

    task = sources.shapes(per_class=6)
    root = tmp_path / "imagefolder"
    for split, idx in {"validation": range(0, 36, 2), "test": range(1, 36, 2)}.items():
        for i in idx:
            folder = root / split / task.classes[task.labels[i]]
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(task.images[i]).save(folder / f"{i}.png")
    spec = TaskSpec(name="shapes", checkpoint="x", dataset=DatasetSpec(uri=str(root)))
    prepared = prepare_task(spec, model, tokenizer_for(CONFIG), CheckpointCache(tmp_path / "c"))
    assert set(prepared.classes) == set(sources.SHAPES)
    assert len(prepared.splits[SELECTION].labels) == 18
    assert len(prepared.splits[REPORT].labels) == 18


def test_create_model_names_what_does_not_fit(model):
    state = dict(model.state_dict())
    state.pop("visual.proj")
    with pytest.raises(ParameterError, match=r"does not fit .*missing \['visual\.proj'\]"):
        create_model(CONFIG, state)
    with pytest.raises(ParameterError, match=r"unknown model 'ViT-Q-99'"):
        create_model("ViT-Q-99")
