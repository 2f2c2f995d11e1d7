"""The CLIP formats users hold, through ``mergeflow run`` on the reduced zoo: the same
models saved as open_clip training checkpoints, the task-vectors papers' pickled modules and
state dicts, transformers CLIPModel folders and FusionBench's layout (a whole CLIPModel base,
vision-only fine-tuned files) score as the zoo's own safetensors do."""

from __future__ import annotations

import io

import mlflow
import pandas as pd
import pytest
import torch
import yaml
from conftest import ZOO_TASKS as TASKS
from formats import (
    hf_clip_config_for_open_clip,
    save_hf_clip_folder,
    save_hf_vision_file,
    task_vectors_checkpoints,
)
from PIL import Image

from mergeflow.checkpoints import load_state_dict, save_state_dict
from mergeflow.cli import main
from zoo.zoo import zoo_spec

# a real Prefect server / every format through the whole pipeline: make test-all only
pytestmark = pytest.mark.full


def run(spec, tmp_path, name) -> dict:
    """``mergeflow run`` of ``spec`` (written as YAML) in this process; the pipeline's result."""
    from flows import merge_pipeline as flow

    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False))
    results = []
    original = flow.merge_pipeline

    def keep(*args, **kwargs):
        results.append(original(*args, **kwargs))
        return results[-1]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(flow, "merge_pipeline", keep)
        assert main(["run", str(path), "--cache-dir", str(tmp_path / f"cache-{name}")]) == 0
    return results[0]


def small_spec(manifest, folder, name, **overrides):
    spec = zoo_spec(
        manifest,
        str(folder),
        name,
        rank_ratios=(0.25,),
        scales=(1.0,),
        baselines=["average", "finetuned", {"method": "regmean", "params": {"samples": 8}}],
    )
    data = spec.model_dump(mode="json")
    for key, value in overrides.items():
        if key == "checkpoints":
            for task in data["tasks"]:
                task["checkpoint"] = str(value[task["name"]])
        else:
            data[key] = value
    return type(spec).parse(data, name)


def report_scores(result) -> dict:
    return {
        label: s["accuracy"]
        for label, s in result["comparison"].items()
        if label in ("average", "finetuned", "regmean samples=8")
    }


def test_every_clip_format_runs_through_the_pipeline(
    prefect_harness, zoo, tracking, tmp_path, capsys
):
    import open_clip

    from mergeflow.models import _register_configs

    folder, manifest = zoo
    # FusionBench's vision-only files have no projection (it is the base's): so that every
    # layout holds the same model, each task's projection here is the base's
    base = load_state_dict(folder / "base.safetensors")
    sources = {t: tmp_path / "zoo" / f"{t}.safetensors" for t in TASKS}
    for task, path in sources.items():
        state = load_state_dict(folder / "checkpoints" / f"{task}.safetensors")
        save_state_dict({**state, "visual.proj": base["visual.proj"]}, path)
    # open_clip's training checkpoint (epoch_N.pt: a state_dict entry, DataParallel names)
    epoch = tmp_path / "epoch_3.pt"
    torch.save(
        {
            "epoch": 3,
            "state_dict": {f"module.{k}": v for k, v in load_state_dict(sources["shapes"]).items()},
        },
        epoch,
    )
    reference = run(
        small_spec(manifest, folder, "fmt-open-clip", checkpoints={**sources, "shapes": epoch}),
        tmp_path,
        "open-clip",
    )

    # the task-vectors papers' pickled ImageEncoder modules and their state dicts
    modules, states, _, (marker, _) = task_vectors_checkpoints(
        tmp_path / "tv", manifest["config"]["model"], [sources[t] for t in TASKS]
    )
    task_vectors = dict(zip(TASKS, modules, strict=True))
    task_vectors["digits"] = states[TASKS.index("digits")]
    tv_result = run(
        small_spec(manifest, folder, "fmt-task-vectors", checkpoints=task_vectors),
        tmp_path,
        "task-vectors",
    )
    assert not marker.exists()  # no pickled code ran

    # transformers CLIPModel folders (the model named by the base folder's config.json), and
    # FusionBench's layout: vision-only fine-tuned models, saved by transformers 5 or as files
    _register_configs()
    config = hf_clip_config_for_open_clip(open_clip.get_model_config(manifest["config"]["model"]))
    base_folder = tmp_path / "hf" / "base"
    save_hf_clip_folder(load_state_dict(folder / "base.safetensors"), config, base_folder)
    whole = {t: tmp_path / "hf" / t for t in TASKS}
    for task, path in whole.items():
        save_hf_clip_folder(load_state_dict(sources[task]), config, path)
    hf_result = run(
        small_spec(
            manifest,
            folder,
            "fmt-hf-clip",
            model=str(base_folder),
            base=str(base_folder),
            checkpoints=whole,
        ),
        tmp_path,
        "hf-clip",
    )
    vision_only = {t: tmp_path / "fb" / f"{t}.safetensors" for t in TASKS}
    vision_only["shapes"] = tmp_path / "fb" / "shapes"
    _vision_only(load_state_dict(sources["shapes"]), config).save_pretrained(vision_only["shapes"])
    for task in ("letters", "digits"):
        save_hf_vision_file(load_state_dict(sources[task]), vision_only[task])
    fb_result = run(
        small_spec(
            manifest,
            folder,
            "fmt-fusion-bench",
            model=str(base_folder),
            base=str(base_folder),
            checkpoints=vision_only,
        ),
        tmp_path,
        "fusion-bench",
    )

    # one model under four namings: the same weights, the same scores
    expected = report_scores(reference)
    assert set(expected) == {"average", "finetuned", "regmean samples=8"}  # data-aware too
    assert set(expected["finetuned"]) == set(TASKS)
    assert report_scores(tv_result) == expected
    assert report_scores(hf_result) == expected
    assert report_scores(fb_result) == expected

    # CART on open_clip's packed in_proj: the same merge; on transformers' names q, k and v
    # are factorized apart (FusionBench's convention), one merge for both HF layouts
    def cart(result):
        return next(p["accuracy"] for p in result["grid"] if p["method"] == "cart")

    assert cart(tv_result) == cart(reference)
    assert cart(fb_result) == cart(hf_result)
    out = capsys.readouterr().out
    assert "registered: models:/fmt-fusion-bench/1" in out

    # the registered transformers-CLIP model classifies as transformers' own CLIPModel does
    _check_registered_hf_model(folder, fb_result, base_folder, "fmt-fusion-bench")


def _vision_only(state, config):
    from transformers import CLIPVisionModel

    from mergeflow.hf_clip import from_open_clip

    model = CLIPVisionModel(config.vision_config)
    names = {
        k.removeprefix("vision_model."): v
        for k, v in from_open_clip(state).items()
        if k.startswith("vision_model.")
    }
    model.load_state_dict(names)
    return model


def _check_registered_hf_model(folder, result, base_folder, name):
    from datasets import Dataset
    from safetensors.torch import load_file
    from transformers import CLIPModel

    registered = mlflow.pyfunc.load_model(f"models:/{name}@champion")
    wrapped = registered.unwrap_python_model()
    artifacts = mlflow.artifacts.download_artifacts(
        f"runs:/{result['registration']['run_id']}/merged_model/artifacts"
    )
    weights = load_file(f"{artifacts}/weights.safetensors")
    assert any(k.startswith("vision_model.") for k in weights)  # kept in transformers' names
    assert any(k.startswith("text_model.") for k in weights)  # the base's, carried
    rows = []
    for task in TASKS:
        data = Dataset.from_parquet(str(folder / "data" / task / "test.parquet")).select(range(6))
        data = data.cast_column("image", data.features["image"].__class__(decode=False))
        rows += [{"task": task, "image": r["image"]["bytes"]} for r in data]
    frame = pd.DataFrame(rows)
    predicted = registered.predict(frame)["label_index"].tolist()
    # transformers' own forward pass on the registered weights and heads
    hf_model = CLIPModel.from_pretrained(base_folder)
    missing, unexpected = hf_model.load_state_dict(weights, strict=False)
    assert not unexpected and all("position_ids" in k for k in missing)
    expected = []
    for task in TASKS:
        images = torch.stack(
            [
                wrapped.transform(Image.open(io.BytesIO(b)))
                for b in frame[frame.task == task]["image"]
            ]
        )
        with torch.no_grad():
            features = hf_model.get_image_features(pixel_values=images)
        if not isinstance(features, torch.Tensor):
            features = features.pooler_output
        features = features / features.norm(dim=-1, keepdim=True)
        expected += (features @ wrapped.heads[task].T).argmax(1).tolist()
    assert predicted == expected
