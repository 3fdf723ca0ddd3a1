import pytest

from microlm.config import PROFILES, load_config
from microlm.errors import ConfigError


@pytest.mark.parametrize("profile", PROFILES)
def test_every_profile_loads_strictly(profile):
    cfg = load_config(profile)
    assert cfg.profile == profile
    assert cfg.run_path.name == profile
    assert 0 < cfg.corpus.dedup.threshold < 1


def test_unknown_key_is_an_error_naming_the_key():
    with pytest.raises(ConfigError, match=r"unknown config key 'corpus\.dedup\.treshold'"):
        load_config("smoke", {"corpus.dedup.treshold": 0.9})


def test_unknown_top_level_key_in_file(tmp_path):
    p = tmp_path / "x.yaml"
    p.write_text("profile: x\nbogus: 1\n")
    with pytest.raises(ConfigError, match="unknown config key 'bogus'"):
        load_config(str(p))


@pytest.mark.parametrize("override,msg", [
    ({"corpus.min_chars": "ten"}, "not of type int"),
    ({"corpus.min_chars": True}, "not of type int"),
    ({"corpus.dedup.threshold": 1.5}, "threshold"),
    ({"corpus.dedup.bands": 7}, "divide"),
    ({"corpus.min_chars": 50, "corpus.max_chars": 10}, "min_chars"),
])
def test_bad_values_are_rejected(override, msg):
    with pytest.raises(ConfigError, match=msg):
        load_config("smoke", override)


def test_string_overrides_are_parsed_as_yaml():
    cfg = load_config("smoke", ["corpus.dedup.threshold=0.9", "data.max_records=null", "corpus.eos=<|eot|>"])
    assert cfg.corpus.dedup.threshold == 0.9
    assert cfg.data.max_records is None
    assert cfg.corpus.eos == "<|eot|>"
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config("smoke", ["corpus.min_chars"])


def test_missing_config_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="config not found"):
        load_config("nosuchprofile")
    p = tmp_path / "bad.yaml"
    p.write_text("corpus: [unclosed\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(str(p))
