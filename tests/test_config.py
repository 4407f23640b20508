"""One config object drives a run: YAML round trip and clear errors."""

import pytest

from tfrec.config import Config


def test_yaml_round_trip(tmp_path):
    cfg = Config()
    cfg.train.epochs = 5
    cfg.model.hidden_units = (256, 64)
    path = str(tmp_path / "c.yaml")
    cfg.to_yaml(path)
    loaded = Config.from_yaml(path)
    assert loaded == cfg and loaded.model.hidden_units == (256, 64)


def test_shipped_config_file_is_the_default():
    assert Config.from_yaml("configs/retrieval.yaml") == Config()


def test_shipped_search_config_lists_every_field_at_its_default():
    """configs/search.yaml says it is the full default config: every field, in order."""
    import dataclasses

    import yaml

    from tfrec.search.config import SearchConfig

    with open("configs/search.yaml", encoding="utf-8") as f:
        listed = list(yaml.safe_load(f))
    assert listed == [field.name for field in dataclasses.fields(SearchConfig)]
    assert SearchConfig.from_yaml("configs/search.yaml") == SearchConfig()


@pytest.mark.parametrize("raw, message", [
    ({"trian": {}}, "unknown config section 'trian'"),
    ({"train": {"epoch": 3}}, "unknown config field train.epoch"),
    ({"train": {"epochs": "3"}}, "train.epochs must be int"),
    ({"train": {"epochs": 2.5}}, "train.epochs must be an integer"),
    ({"model": {"logq_correction": "yes"}}, "must be true/false"),
    ({"train": 5}, "must be a mapping"),
    ({"ranking": {"patience": "abc"}}, "ranking.patience must be an integer or null"),
    ({"ranking": {"patience": 1.5}}, "ranking.patience must be an integer or null"),
    ({"train": {"steps_per_epoch": True}}, "train.steps_per_epoch must be an integer or null"),
])
def test_bad_values_name_the_field(raw, message):
    with pytest.raises(ValueError, match=message):
        Config.from_dict(raw)


def test_cli_style_overrides():
    cfg = Config().override(["train.epochs=7", "model.hidden_units=[32]", "train.tpu=null",
                             "ranking.patience=3"])
    assert cfg.train.epochs == 7 and cfg.model.hidden_units == (32,) and cfg.train.tpu is None
    assert cfg.ranking.patience == 3 and Config().override(
        ["ranking.patience=null"]).ranking.patience is None
    with pytest.raises(ValueError, match="section.field=value"):
        Config().override(["epochs=3"])


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Config.from_yaml(str(tmp_path / "nope.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("- just\n- a list\n")
    with pytest.raises(ValueError, match="must hold a mapping"):
        Config.from_yaml(str(bad))


def test_nested_dp_settings_from_set_and_yaml(tmp_path):
    cfg = Config().override(["train.dp={noise_multiplier: 1.1}", "train.dp.l2_clip=0.5",
                             "train.dp.delta=1e-6"])  # YAML reads 1e-6 as a string
    assert (cfg.train.dp.noise_multiplier, cfg.train.dp.l2_clip, cfg.train.dp.delta) == (
        1.1, 0.5, 1e-6)
    path = str(tmp_path / "dp.yaml")
    cfg.to_yaml(path)
    assert Config.from_yaml(path).train.dp == cfg.train.dp
    with pytest.raises(ValueError, match="unknown config field train.dp.clip"):
        Config().override(["train.dp.clip=1"])
    assert Config().override(["train.dp=null"]).train.dp is None
