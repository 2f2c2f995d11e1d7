import pytest

from mergeflow import ParameterError
from mergeflow.spec import MergeSpec


def spec_dict(**overrides):
    data = {
        "model": "mergeflow-tiny-vit",
        "base": "s3://zoo/base.safetensors",
        "tasks": [
            {
                "name": name,
                "checkpoint": f"s3://zoo/{name}.safetensors",
                "dataset": {"uri": f"s3://zoo/data/{name}"},
                "classes": ["a", "b", "c"],
                "templates": ["a photo of {c}."],
            }
            for name in ("mnist", "shapes", "letters")
        ],
        "grid": {"rank_ratios": [0.16, 0.04, 0.08], "scales": [1.0]},
        "registered_model": "zoo-merged",
    }
    data.update(overrides)
    return data


def test_round_trips_through_yaml(tmp_path):
    spec = MergeSpec.parse(spec_dict())
    assert spec.grid.rank_ratios == (0.04, 0.08, 0.16)
    path = tmp_path / "spec.yaml"
    path.write_text(spec.to_yaml())
    assert MergeSpec.from_yaml(path) == spec
    assert len(spec.grid.points()) == 3


def _task(i, **changes):
    data = spec_dict()
    data["tasks"][i].update(changes)
    return data


@pytest.mark.parametrize(
    "data,field",
    [
        (spec_dict(model="ViT-Q-99"), r"model: unknown model 'ViT-Q-99'"),
        (spec_dict(grid={"rank_ratios": [0.1, 1.5]}), r"grid\.rank_ratios: rank ratio 1\.5"),
        (spec_dict(grid={"rank_ratios": [0.0]}), r"grid\.rank_ratios: rank ratio 0\.0"),
        (spec_dict(grid={"rank_ratios": []}), r"grid\.rank_ratios"),
        (spec_dict(grid={"scales": []}), r"grid\.scales"),
        (spec_dict(baselines=["average", "magic"]), r"baselines: entry 1: unknown merge method"),
        (
            spec_dict(baselines=[{"method": "ties", "params": {"density": 2}}]),
            r"baselines: entry 0: method 'ties', parameter 'density'",
        ),
        (
            spec_dict(baselines=[{"method": "tall_masks", "params": {"task": 1}}]),
            r"entry 0: method 'tall_masks' builds one model per task",
        ),
        (
            spec_dict(grid={"families": [{"method": "pcb", "search": {"ratio": [0.1, 3]}}]}),
            r"grid\.families\.0: method 'pcb', parameter 'ratio'",
        ),
        (spec_dict(device="gpu"), r"device: use auto, cpu, cuda"),
        (spec_dict(colour="red"), r"colour"),
        (_task(1, templates=["no placeholder"]), r"tasks\.1\.templates: .*'\{c\}'"),
        (_task(0, classes=["a", "a"]), r"tasks\.0\.classes: class names must be distinct"),
        (_task(2, name="bad name!"), r"tasks\.2\.name"),
        (_task(2, name="mnist"), r"tasks: task names must be distinct: 'mnist'"),
        (spec_dict(tasks=spec_dict()["tasks"][:1]), r"tasks: .*at least 2"),
        (spec_dict(registered_model=None), r"registered_model"),
    ],
)
def test_invalid_specs_name_the_field(data, field):
    with pytest.raises(ParameterError, match=field):
        MergeSpec.parse(data)


def test_yaml_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ParameterError, match=r"bad\.yaml: not valid YAML"):
        MergeSpec.from_yaml(bad)
    with pytest.raises(ParameterError, match=r"absent\.yaml: cannot read"):
        MergeSpec.from_yaml(tmp_path / "absent.yaml")


def test_baselines_and_families_name_methods_with_parameters(tmp_path):
    spec = MergeSpec.parse(
        spec_dict(
            baselines=[
                "average",
                "finetuned",
                {"method": "ties", "params": {"density": 0.1}},
                {"method": "pcb", "label": "pcb default"},
                "tall_masks",
            ],
            grid={
                "rank_ratios": [0.1],
                "families": [{"method": "dare", "params": {"p": 0.3}, "search": {"scale": [1, 2]}}],
            },
            compression={"rank_ratio": 0.2},
        )
    )
    assert [b.name for b in spec.baseline_methods()] == [
        "average",
        "ties density=0.1",
        "pcb default",
        "tall_masks",
    ]
    assert spec.has_reference("finetuned") and not spec.has_reference("zeroshot")
    points = spec.grid.families[0].points()
    assert [p.params for p in points] == [{"p": 0.3, "scale": 1}, {"p": 0.3, "scale": 2}]
    assert (points[1].method, points[1].name) == ("dare", "dare p=0.3 scale=2")
    path = tmp_path / "spec.yaml"
    path.write_text(spec.to_yaml())
    assert MergeSpec.from_yaml(path) == spec


@pytest.mark.parametrize(
    ("changes", "where"),
    [
        ({"base": "file:///etc/passwd"}, "base"),
        ({"base": "/etc/passwd"}, "base"),
        ({"base": "s3://zoo/../private/base.safetensors"}, "base"),
        ({"base": "s3://zoological/base.safetensors"}, "base"),
    ],
)
def test_allowed_roots_refuse_anything_outside(changes, where):
    with pytest.raises(ParameterError, match=rf"{where}: .* is outside the allowed roots"):
        MergeSpec.parse(spec_dict(allowed_roots=["s3://zoo/", "s3://zoo-data/"], **changes))


def test_allowed_roots_admit_what_lies_under_them(tmp_path):
    data = spec_dict(allowed_roots=["s3://zoo/"])
    for task in data["tasks"]:
        task["dataset"]["uri"] = task["dataset"]["uri"].replace("s3://zoo/data", "s3://elsewhere")
    with pytest.raises(ParameterError, match=r"tasks\.0\.dataset\.uri: 's3://elsewhere/mnist'"):
        MergeSpec.parse(data)
    local = spec_dict(allowed_roots=[str(tmp_path)], base=str(tmp_path / "base.safetensors"))
    for i, task in enumerate(local["tasks"]):
        task["checkpoint"] = str(tmp_path / f"t{i}.safetensors")
        task["dataset"]["uri"] = str(tmp_path / f"data{i}")
    assert MergeSpec.parse(local).allowed_roots == (str(tmp_path),)
    (tmp_path / "link").symlink_to("/etc")
    local["base"] = str(tmp_path / "link" / "passwd")
    with pytest.raises(ParameterError, match="base: .* is outside the allowed roots"):
        MergeSpec.parse(local)


def test_a_stored_spec_with_overrides_is_validated_again(tmp_path):
    from mergeflow.spec import GridSpec, SpecOverrides, load_spec, resolve_spec

    stored = tmp_path / "stored.yaml"
    spec = MergeSpec.parse(spec_dict())
    stored.write_text(spec.to_yaml())
    assert resolve_spec(spec_uri=str(stored)) == spec == load_spec(str(stored))
    changed = resolve_spec(
        spec_uri=str(stored),
        overrides=SpecOverrides(
            grid=GridSpec(rank_ratios=(0.3,), scales=(2.0,)),
            baselines=("average",),
            registered_model="other",
        ),
    )
    assert changed.grid.points() == [(0.3, 2.0)]
    assert (changed.baselines, changed.registered_model) == (("average",), "other")
    assert changed.tasks == spec.tasks
    # an override that breaks the spec is refused naming the field and where it came from
    with pytest.raises(ParameterError, match=r"with overrides \['baselines'\]: baselines"):
        resolve_spec(spec, overrides=SpecOverrides(baselines=("slerp",)))
    with pytest.raises(ParameterError, match="exactly one of spec and spec_uri"):
        resolve_spec(spec, spec_uri=str(stored))
    with pytest.raises(ParameterError, match="no such spec file"):
        resolve_spec(spec_uri=str(tmp_path / "missing.yaml"))
