from pathlib import Path

import pytest

from innercontrol.config import ConfigError, describe_schema, load_config, valid_keys

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_defaults():
    cfg = load_config()
    assert cfg.optim.lr == 1e-5
    assert cfg.loss.reward_window == [0, 400]
    assert cfg.model.tap == "attn"
    assert cfg.probe.projection_dim == 384


def test_yaml_override_anchor_values():
    hed = load_config(str(CONFIGS / "hed.yaml"))
    assert hed.condition.name == "hed"
    assert hed.loss.reward_weight == 1.0
    assert hed.loss.reward_window == [0, 200]
    assert hed.loss.alignment_window == [0, 920]
    assert hed.data.control_column is None
    depth = load_config(str(CONFIGS / "depth.yaml"))
    assert depth.loss.reward_weight == 0.5
    assert depth.model.controlnet == "lllyasviel/control_v11f1p_sd15_depth"
    assert depth.optim.batch_size * depth.optim.gradient_accumulation * 8 == 256


def test_cli_override_wins_over_yaml():
    cfg = load_config(str(CONFIGS / "depth.yaml"), ["optim.lr=2e-5", "loss.reward_window=[0,300]", "model.tap=conv"])
    assert cfg.optim.lr == pytest.approx(2e-5)
    assert cfg.loss.reward_window == [0, 300]
    assert cfg.model.tap == "conv"


def test_unknown_key_names_closest_valid_key(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown config key 'optim.learning_rat'.*did you mean 'optim.lr"):
        load_config(None, ["optim.learning_rat=1"])
    with pytest.raises(ConfigError, match="did you mean 'loss.reward_weight'"):
        load_config(None, ["loss.reward_wieght=1"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("loss:\n  alignment_widow: [0, 900]\n")
    with pytest.raises(ConfigError, match=r"bad.yaml.*did you mean 'loss.alignment_window'"):
        load_config(str(bad))
    bad.write_text("modle:\n  tap: attn\n")
    with pytest.raises(ConfigError, match="did you mean 'model'"):
        load_config(str(bad))


def test_bad_values_are_errors():
    with pytest.raises(ConfigError, match="optim.lr"):
        load_config(None, ["optim.lr=fast"])
    with pytest.raises(ConfigError, match="model.tap='mlp' is not one of attn, conv"):
        load_config(None, ["model.tap=mlp"])
    with pytest.raises(ConfigError, match="reward_window"):
        load_config(None, ["loss.reward_window=[500,100]"])
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["optim.lr"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("configs/nope.yaml")


def test_every_shipped_config_loads():
    for path in sorted(CONFIGS.glob("*.yaml")):
        load_config(str(path))


def test_schema_table_lists_every_key():
    table = describe_schema()
    for key in valid_keys():
        assert f"`{key}`" in table


def test_yaml_bool_words_stay_strings_on_the_command_line():
    cfg = load_config(None, ["optim.mixed_precision=no", "eval.mixed_precision=no", "probe.trust_pickle=yes"])
    assert cfg.optim.mixed_precision == "no" and cfg.eval.mixed_precision == "no"
    assert cfg.probe.trust_pickle is True


def test_readme_configuration_reference_is_current():
    readme = (CONFIGS.parent / "README.md").read_text()
    start, end = "<!-- config-reference:start -->\n", "\n<!-- config-reference:end -->"
    assert start in readme and end in readme
    table = readme.split(start, 1)[1].split(end, 1)[0]
    assert table == describe_schema(), "README out of date: paste the output of `python -m innercontrol.config`"


def test_reward_graph_chunk_must_be_positive():
    with pytest.raises(ConfigError, match="reward_cuda_graph_max_chunk .* must be >= 1, got 0"):
        load_config(None, ["model.reward_cuda_graph_max_chunk=0"])
    assert load_config(None, ["model.reward_cuda_graph_max_chunk=2"]).model.reward_cuda_graph_max_chunk == 2
