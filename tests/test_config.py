from dataclasses import is_dataclass
from pathlib import Path
from typing import Optional, get_type_hints

import pytest

from innercontrol.config import (
    LR_SCHEDULES,
    RANGES,
    TRACKERS,
    Config,
    ConfigError,
    describe_schema,
    load_config,
    valid_keys,
)

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
    # The published recipes draw training timesteps uniformly.
    assert hed.loss.timestep_sampling == depth.loss.timestep_sampling == "uniform"
    assert hed.loss.diffusion_weighting == depth.loss.diffusion_weighting == "uniform"  # and the plain MSE
    assert hed.loss.diffusion_weight == depth.loss.diffusion_weight == 1.0  # at full weight
    assert hed.loss.corrective_fraction == depth.loss.corrective_fraction == 0.0  # every noisy latent from its image


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
    with pytest.raises(ConfigError, match="model.tap='mlp' is not allowed: model.tap must be one of attn, conv"):
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
    with pytest.raises(ConfigError, match=r"reward_cuda_graph_max_chunk=0 is not allowed: .* must be >= 1"):
        load_config(None, ["model.reward_cuda_graph_max_chunk=0"])
    assert load_config(None, ["model.reward_cuda_graph_max_chunk=2"]).model.reward_cuda_graph_max_chunk == 2


@pytest.mark.parametrize(
    "override, allowed",
    [
        ("data.resolution=100", "data.resolution must be a positive multiple of 8"),
        ("eval.resolution=100", "eval.resolution must be a positive multiple of 8"),
        ("data.resolution=0", "data.resolution must be a positive multiple of 8"),
        ("optim.batch_size=0", r"optim.batch_size \(the batch per process\) must be >= 1"),
        ("optim.max_steps=0", "optim.max_steps must be >= 1"),
        ("probe.max_steps=-5", "probe.max_steps must be >= 1"),
        ("eval.images_per_prompt=0", r"eval.images_per_prompt must be in \[1, 1024\]"),
        ("eval.images_per_prompt=1025", r"eval.images_per_prompt must be in \[1, 1024\]"),
        ("eval.num_inference_steps=0", "eval.num_inference_steps must be >= 1"),
        ("optim.lr=0", "optim.lr must be > 0"),
        ("optim.weight_decay=-0.1", "optim.weight_decay must be >= 0"),
        ("optim.adam_beta2=1.0", r"optim.adam_beta2 must be in \[0, 1\)"),
        ("optim.adam_eps=0", "optim.adam_eps must be > 0"),
        ("optim.max_grad_norm=0", "optim.max_grad_norm .* must be > 0"),
        ("optim.warmup_steps=-1", "optim.warmup_steps must be >= 0"),
        ("optim.gradient_accumulation=0", "optim.gradient_accumulation must be >= 1"),
        ("optim.ema_decay=1.5", r"optim.ema_decay must be in \[0, 1\]"),
        ("optim.lr_schedule=cosine_annealing", "optim.lr_schedule must be one of constant, constant_with_warmup"),
        ("logging.checkpoint_every=0", "logging.checkpoint_every .* must be >= 1"),
        ("logging.checkpoint_total_limit=0", "logging.checkpoint_total_limit .* must be >= 1"),
        ("logging.validation_every=-1", "logging.validation_every .* must be >= 0"),
        ("logging.report_to=tensorbord", "logging.report_to must be one of none, tensorboard"),
        ("data.num_workers=-1", "data.num_workers .* must be >= 0"),
        ("data.max_bad_fraction=2", r"data.max_bad_fraction .* must be in \[0, 1\]"),
        ("data.max_samples=0", "data.max_samples must be null or >= 1"),
        ("eval.batch_size=0", "eval.batch_size must be >= 1"),
        ("eval.guidance_scale=-1", "eval.guidance_scale .* must be >= 0"),
        ("eval.seed=-1", "eval.seed must be in"),
        ("condition.name=segmentation", "condition.name must be a registered condition: canny, depth, hed, lineart"),
        ("probe.projection_dim=2", "probe.projection_dim .* must be >= 4"),
        ("loss.reward_weight=-0.5", "loss.reward_weight must be >= 0"),
        ("loss.timestep_sampling=logit", "loss.timestep_sampling must be one of uniform, cubic"),
        ("loss.diffusion_weighting=snr", "loss.diffusion_weighting must be one of uniform, v"),
        (
            "loss.diffusion_weight_max=0.5",
            r"loss.diffusion_weight_max \(the largest weight on the epsilon MSE before normalisation\) must be >= 1",
        ),
        ("loss.diffusion_weight=-1", "loss.diffusion_weight must be >= 0"),
        ("loss.corrective_fraction=1.5", r"loss.corrective_fraction .* must be in \[0, 1\]"),
        ("loss.corrective_window=[600,400]", r"loss.corrective_window must be \[t_min, t_max\]"),
        ("loss.corrective_window=[0,999]", r"loss.corrective_window must be \[t_min, t_max\] with 200 <= t_min"),
        ("model.pretrained_model=' '", "model.pretrained_model must be a non-empty string"),
    ],
)
def test_out_of_range_values_fail_at_load_naming_key_and_range(override, allowed):
    key, value = override.split("=", 1)
    with pytest.raises(ConfigError, match=f"^{key}=.* is not allowed: {allowed}"):
        load_config(None, [override])


def test_values_at_the_edge_of_their_range_load():
    edges = [
        "data.resolution=8",
        "eval.resolution=520",
        "optim.batch_size=1",
        "optim.max_steps=1",
        "eval.images_per_prompt=1024",
        "optim.ema_decay=1.0",
        "optim.adam_beta1=0",
        "optim.warmup_steps=0",
        "logging.validation_every=0",
        "data.max_bad_fraction=0",
        "data.max_samples=1",
        "eval.guidance_scale=0",
        "loss.reward_window=[999,999]",
        "model.controlnet=null",
    ]
    cfg = load_config(None, edges)
    assert (cfg.data.resolution, cfg.eval.resolution, cfg.eval.images_per_prompt) == (8, 520, 1024)
    assert cfg.optim.ema_decay == 1.0 and cfg.loss.reward_window == [999, 999]


def test_every_key_of_the_schema_has_a_range():
    # Booleans are held to true/false by the schema's types; every other key needs an entry in RANGES.
    def boolean_keys(schema, prefix=""):
        for name, kind in get_type_hints(schema).items():
            if is_dataclass(kind):
                yield from boolean_keys(kind, f"{prefix}{name}.")
            elif kind in (bool, Optional[bool]):
                yield prefix + name

    typed = set(valid_keys()) - set(boolean_keys(Config))
    assert sorted(set(typed) - set(RANGES)) == [], "add the new keys to RANGES in innercontrol/config.py"
    assert sorted(set(RANGES) - set(valid_keys())) == [], "RANGES names keys the schema no longer has"


def test_range_choices_match_the_libraries():
    from accelerate.utils import LoggerType
    from diffusers.optimization import SchedulerType

    assert set(LR_SCHEDULES) <= {s.value for s in SchedulerType}
    assert set(TRACKERS) - {"none"} <= {t.value for t in LoggerType}
