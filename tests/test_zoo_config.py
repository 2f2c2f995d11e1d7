"""The zoo's build key: a built zoo is reused only for the same settings and the same model
architecture (a config file changed under the same name rebuilds it)."""

import copy

import open_clip.factory
import pytest

from zoo.zoo import ZooConfig


def test_the_same_settings_give_the_same_key():
    assert ZooConfig().digest() == ZooConfig().digest()
    assert ZooConfig(finetune_steps=10).digest() != ZooConfig().digest()


def test_a_changed_architecture_under_the_same_name_changes_the_key(monkeypatch):
    config = ZooConfig()
    before = config.digest()
    changed = copy.deepcopy(open_clip.factory._MODEL_CONFIGS[config.model])
    changed["vision_cfg"]["patch_size"] = 8
    monkeypatch.setitem(open_clip.factory._MODEL_CONFIGS, config.model, changed)
    assert config.digest() != before


def test_an_unknown_model_is_named():
    with pytest.raises(ValueError, match="zoo model 'no-such-vit'"):
        ZooConfig(model="no-such-vit").digest()


class _Stop(Exception):
    pass


def _stop_at(word):
    """A ``say`` for build_zoo that records its lines and stops the build at ``word``."""
    lines = []

    def say(line):
        lines.append(line)
        if word in line:
            raise _Stop(line)

    return say, lines


def test_split_sizes_that_leave_too_few_training_images_are_refused(tmp_path):
    from zoo.zoo import MIN_TRAIN_IMAGES, build_zoo

    config = ZooConfig(tasks=("shapes", "digits"), max_per_task=600)
    with pytest.raises(ValueError) as refused:
        build_zoo(tmp_path / "zoo", config, say=lambda line: None)
    message = str(refused.value)
    assert "zoo task 'shapes': 600 images leave 0 for training after test_size 400" in message
    assert f"at least {MIN_TRAIN_IMAGES} are needed" in message
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_a_failed_build_leaves_no_zoo_that_a_later_call_could_reuse(tmp_path):
    from zoo.zoo import build_zoo

    config = ZooConfig(
        tasks=("shapes", "digits"), max_per_task=300, test_size=60, validation_size=40
    )
    say, lines = _stop_at("pretraining")  # after the data is written, before the model
    with pytest.raises(_Stop):
        build_zoo(tmp_path / "zoo", config, say=say)
    assert any("data: 2 tasks written" in line for line in lines)
    assert list(tmp_path.iterdir()) == []  # no zoo, no staging folder


def test_a_zoo_is_reused_only_for_the_same_data(zoo, tmp_path):
    """The session's zoo, copied: reused as it is; rebuilt once its data digest differs
    (as it would after a source package changed its images)."""
    import json
    import shutil

    from conftest import ZOO_TASKS

    from zoo.zoo import build_zoo

    folder, manifest = zoo
    config = ZooConfig(**manifest["config"])
    assert config.tasks == ZOO_TASKS
    copy_dir = tmp_path / "zoo"
    shutil.copytree(folder, copy_dir)
    say, lines = _stop_at("building into")
    assert build_zoo(copy_dir, config, say=say)["data_digest"] == manifest["data_digest"]
    assert lines[-1].startswith(f"zoo: reusing {copy_dir}")
    # a source package upgraded: what the data is made from differs, and so does the data
    stale = {**manifest, "data_digest": "0" * 16, "sources": "0" * 16}
    (copy_dir / "zoo.json").write_text(json.dumps(stale))
    with pytest.raises(_Stop, match="the zoo there was built from other data"):
        build_zoo(copy_dir, config, say=say)
    assert json.loads((copy_dir / "zoo.json").read_text()) == stale  # the old one untouched


def test_a_zoo_made_from_the_same_sources_is_reused_without_making_its_data(
    zoo, tmp_path, monkeypatch
):
    """The reuse check reads no data while the sources' code and packages are the ones the
    zoo was built from; once they differ, it makes the data and compares it: the same data
    is reused, and the new provenance is recorded, so the next check reads none again."""
    import json
    import shutil

    from zoo import sources
    from zoo.zoo import build_zoo

    folder, manifest = zoo
    config = ZooConfig(**manifest["config"])
    assert manifest["sources"] == sources.provenance()
    copy_dir = tmp_path / "zoo"
    shutil.copytree(folder, copy_dir)
    made = []
    real = dict(sources.SOURCES)
    for name, source in real.items():
        monkeypatch.setitem(sources.SOURCES, name, lambda s=source, n=name: made.append(n) or s())
    say, lines = _stop_at("building into")

    assert build_zoo(copy_dir, config, say=say) == manifest
    assert made == [] and lines[-1].startswith(f"zoo: reusing {copy_dir}")

    monkeypatch.setattr(sources, "provenance", lambda: "f" * 16)  # a package upgraded
    reused = build_zoo(copy_dir, config, say=say)
    assert made == list(config.tasks)  # the data made again, found the same
    assert lines[-1].endswith("its data is the same)")
    assert reused["data_digest"] == manifest["data_digest"] and reused["sources"] == "f" * 16
    assert json.loads((copy_dir / "zoo.json").read_text()) == reused

    made.clear()
    build_zoo(copy_dir, config, say=say)
    assert made == []


def test_the_sources_provenance_follows_their_packages(monkeypatch):
    from importlib import metadata

    from zoo import sources

    before = sources.provenance()
    assert sources.provenance() == before  # nothing in it varies between calls
    real = metadata.version

    def upgraded(name):
        return "99.0" if name == "scikit-image" else real(name)

    monkeypatch.setattr(metadata, "version", upgraded)
    assert sources.provenance() != before
