import pytest

from microlm.config import PROFILES
from microlm.errors import ConfigError
from microlm.stages import load_config


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


def test_a_profile_extends_another_and_lists_only_what_differs(tmp_path, monkeypatch):
    cpu, laptop = load_config("cpu"), load_config("laptop")
    assert laptop.profile == "laptop" and laptop.pretrain == cpu.pretrain and laptop.model == cpu.model
    assert laptop.qwen == "Qwen/Qwen2.5-0.5B-Instruct" and cpu.qwen is None
    assert [r["base"] for r in laptop.ie_lora.runs][0] == "qwen"
    assert laptop.ie_lora.r == cpu.ie_lora.r  # a nested section merges key by key ...
    assert laptop.serve_bench.concurrency == [1, 8, 16] and laptop.serve_bench.datasets == cpu.serve_bench.datasets
    (tmp_path / "configs").mkdir()
    (tmp_path / "pyproject.toml").write_text("")
    (tmp_path / "configs" / "mine.yaml").write_text("extends: laptop\nie_lora: {r: 4}\n")
    (tmp_path / "configs" / "loop.yaml").write_text("extends: loop2\n")
    (tmp_path / "configs" / "loop2.yaml").write_text("extends: loop\n")
    monkeypatch.chdir(tmp_path)
    mine = load_config("mine")
    assert mine.profile == "mine" and mine.ie_lora.r == 4 and mine.ie_lora.runs == laptop.ie_lora.runs  # ... lists replace
    with pytest.raises(ConfigError, match="cycle"):
        load_config("loop")


def test_the_qwen_model_is_named_once_and_microlm_qwen_overrides_it(monkeypatch):
    from microlm.config import qwen_model, resolve_model_name

    cfg = load_config("laptop")
    monkeypatch.delenv("MICROLM_QWEN", raising=False)
    assert resolve_model_name(cfg, "qwen") == "Qwen/Qwen2.5-0.5B-Instruct" and resolve_model_name(cfg, "hf") == "hf"
    monkeypatch.setenv("MICROLM_QWEN", "/models/my-qwen")
    assert qwen_model(cfg) == "/models/my-qwen"
    monkeypatch.delenv("MICROLM_QWEN")
    with pytest.raises(ConfigError, match="MICROLM_QWEN"):
        qwen_model(load_config("cpu"))


def test_a_run_of_ie_lora_may_change_its_own_settings():
    from microlm.stages.ie_lora import ie_lora_run_config

    cfg = load_config("laptop")
    qwen = ie_lora_run_config(cfg, cfg.ie_lora.runs[0])
    assert qwen.ie_lora.train.lr == 0.0003 and qwen.ie_lora.dropout == 0.0 and qwen.ie_lora.train.max_steps == 120
    assert cfg.ie_lora.train.lr == 0.002 and ie_lora_run_config(cfg, cfg.ie_lora.runs[1]) is cfg
    for bad, msg in (("{train.lrr: 1}", "unknown config key"), ("{dropout: 2}", "dropout"), ("[1]", "mapping"),
                     ("{runs: []}", "cannot set")):
        with pytest.raises(ConfigError, match=msg):
            load_config("smoke", [f"ie_lora.runs=[{{name: a, base: hf, engine: peft, with: {bad}}}]"])


@pytest.mark.parametrize("override,msg", [
    ({"ie_eval.protocols": ["iepile"]}, "protocols"),
    ({"ie_eval.protocols": ["ours", "theirs"]}, "protocols"),
    ({"ie_eval.compare": [["microlm-peft", "nosuch"]]}, "compare"),
    ({"ie_eval.compare": [["microlm-peft", "microlm-peft"]]}, "compare"),
    ({"ie_lora.empty_share": 1.5}, "empty_share"),
    ({"ie_lora.decontaminate": 0.0}, "decontaminate"),
    ({"ie_merged.greedy_prompts": -1}, "greedy_prompts"),
])
def test_bad_pipeline_b_settings_are_one_line_errors(override, msg):
    with pytest.raises(ConfigError, match=msg):
        load_config("smoke", override)


def _leaves(tree: dict, prefix: str = "") -> dict:
    """``{"a.b.c": value}``: a mapping's settings by key path (a list is one setting)."""
    out = {}
    for k, v in tree.items():
        out.update(_leaves(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def test_base_holds_the_shared_settings_and_no_profile_repeats_them():
    import yaml

    from microlm.config import CONFIG_DIR

    base = _leaves(yaml.safe_load((CONFIG_DIR / "base.yaml").read_text(encoding="utf-8")))
    assert "base" not in PROFILES and "profile" not in base and "extends" not in base
    for name in ("smoke", "cpu", "gpu"):
        raw = yaml.safe_load((CONFIG_DIR / f"{name}.yaml").read_text(encoding="utf-8"))
        assert raw["extends"] == "base"
        repeated = [k for k, v in _leaves(raw).items() if k in base and base[k] == v]
        assert not repeated, f"{name}.yaml repeats what base.yaml already says: {repeated}"
    with pytest.raises(ConfigError, match=r"not a profile.*smoke, cpu, laptop, gpu"):
        load_config("base")


def test_an_unknown_key_in_a_profile_that_extends_another_is_an_error(tmp_path):
    p = tmp_path / "mine.yaml"
    p.write_text("extends: smoke\ncorpus:\n  dedup: {treshold: 0.9}\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'corpus\.dedup\.treshold'"):
        load_config(str(p))


@pytest.mark.parametrize("value", [".inf", "-.inf", ".nan"])
def test_a_non_finite_number_is_not_a_setting(value):
    with pytest.raises(ConfigError, match=r"config key 'pretrain.lr'"):
        load_config("smoke", [f"pretrain.lr={value}"])
    with pytest.raises(ConfigError, match=r"config key 'ie_eval.timeout_s'"):
        load_config("smoke", [f"ie_eval.timeout_s={value}"])


@pytest.mark.parametrize("argv, says", [
    (["serve", "--port", "-1"], "a port is 1..65535, got -1"),
    (["serve", "--port", "99999"], "a port is 1..65535, got 99999"),
    (["chat", "--device", "bogus"], "a device is cpu, cuda or cuda:N, got 'bogus'"),
])
def test_bad_cli_values_are_one_usage_line(argv, says, capsys):
    from microlm import cli

    with pytest.raises(SystemExit) as e:
        cli.main([*argv, "-p", "smoke"])
    assert e.value.code == 2 and says in capsys.readouterr().err


def test_chat_on_cuda_without_cuda_is_one_line(capsys):
    import torch

    from microlm import cli

    if torch.cuda.is_available():  # a GPU machine: the device is real, nothing to refuse
        assert cli._device("cuda:0") == "cuda:0"
        return
    assert cli.main(["chat", "-p", "smoke", "--device", "cuda", "--model", "nosuch"]) != 0
    err = capsys.readouterr().err
    assert "--device cuda: this torch has no CUDA device" in err and "Traceback" not in err
