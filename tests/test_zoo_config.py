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
