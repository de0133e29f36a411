import json
import math
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from innercontrol.conditions import CONDITIONS, CheckpointError, get_condition, register_condition
from innercontrol.hub import HubUnreachableError
from innercontrol.metrics import edge_f1

SPECS = Path(__file__).resolve().parent / "specs"  # copies of ../shared/reference/checkpoint_specs
SPEC_FILES = {"hed": "ControlNetHED.pth", "lineart": "sk_model.pth"}


def load_spec(name: str) -> dict:
    return json.loads((SPECS / f"{name}.json").read_text())


def random_state_dict(spec: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """torch.randn of every shape in the spec, scaled by 1/sqrt(fan-in) so activations neither vanish nor saturate."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in spec["state_dict"].items():
        tensor = torch.randn(shape, generator=generator)
        if key == "norm":  # HED's learned input mean, in [0,255] units
            tensor = 127.5 + 20 * tensor
        elif len(shape) == 4:
            tensor = tensor / math.sqrt(math.prod(shape[1:]))
        else:
            tensor = 0.01 * tensor
        state[key] = tensor
    return state


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A random spec checkpoint per weighted condition: name -> (path, state dict)."""
    folder = tmp_path_factory.mktemp("checkpoints")
    out = {}
    for seed, name in enumerate(SPEC_FILES):
        state = random_state_dict(load_spec(name), seed)
        path = folder / SPEC_FILES[name]
        torch.save(state, path)
        out[name] = (path, state)
    return out


@pytest.fixture(scope="module")
def dpt_dir(tmp_path_factory):
    from innercontrol.tiny import build_tiny_dpt

    folder = tmp_path_factory.mktemp("dpt")
    for part in build_tiny_dpt():
        part.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def conditions(checkpoints, dpt_dir):
    return {
        "depth": get_condition("depth", model_path=str(dpt_dir)),
        "hed": get_condition("hed", model_path=str(checkpoints["hed"][0])),
        "lineart": get_condition("lineart", model_path=str(checkpoints["lineart"][0])),
        "canny": get_condition("canny"),
    }


def test_registry_names_and_metrics():
    assert set(CONDITIONS) >= {"depth", "hed", "lineart", "canny"}
    metrics = {name: CONDITIONS[name].metric for name in ("depth", "hed", "lineart", "canny")}
    assert metrics == {"depth": "rmse", "hed": "ms_ssim", "lineart": "ms_ssim", "canny": "f1"}
    with pytest.raises(KeyError, match="registered conditions: canny, depth, hed, lineart"):
        get_condition("segmentation")
    with pytest.raises(ValueError, match="purpose"):
        get_condition("canny", purpose="training")
    with pytest.raises(ValueError, match="registered twice"):
        register_condition("canny")(type("Other", (CONDITIONS["canny"],), {}))


@pytest.mark.parametrize("name", ["hed", "lineart"])
def test_spec_checkpoint_loads_strictly_and_frozen(name, checkpoints, conditions):
    spec = load_spec(name)
    cond = conditions[name]
    loaded = cond.model.state_dict()
    assert {k: list(v.shape) for k, v in loaded.items()} == spec["state_dict"]
    assert sum(v.numel() for v in loaded.values()) == spec["num_params"]
    _, state = checkpoints[name]
    assert all(torch.equal(loaded[k], state[k]) for k in state)
    assert not any(p.requires_grad for p in cond.model.parameters())
    assert not cond.model.training
    cond.train()  # a parent's .train() must leave the frozen model in eval mode
    assert not cond.model.training and not cond.training


@pytest.mark.parametrize("name", ["hed", "lineart"])
def test_mismatched_checkpoints_name_key_and_shapes(name, checkpoints, tmp_path):
    _, state = checkpoints[name]
    spec_shapes = load_spec(name)["state_dict"]
    dropped = next(iter(state))
    missing = {k: v for k, v in state.items() if k != dropped}
    torch.save(missing, tmp_path / "missing.pth")
    with pytest.raises(CheckpointError) as err:
        get_condition(name, model_path=str(tmp_path / "missing.pth"))
    message = str(err.value)
    assert "missing.pth" in message and f"missing keys: {dropped} (expected {spec_shapes[dropped]})" in message
    assert f"{SPEC_FILES[name]} in the hub repository lllyasviel/Annotators" in message

    key = [k for k in state if k.endswith(".weight")][1]
    wrong = dict(state)
    wrong[key] = torch.zeros(3, 3)
    torch.save(wrong, tmp_path / "wrong.pth")
    with pytest.raises(
        CheckpointError, match=rf"{key}: expected \({', '.join(map(str, spec_shapes[key]))}\), found \(3, 3\)"
    ):
        get_condition(name, model_path=str(tmp_path / "wrong.pth"))


def test_pickled_objects_are_refused_with_opt_in(tmp_path):
    path = tmp_path / "pickled.pth"
    torch.save({"block1.convs.0.weight": torch.zeros(1), "extra": Path("x")}, path)
    with pytest.raises(CheckpointError, match=r"pickled\.pth.*trust_pickle=True"):
        get_condition("hed", model_path=str(path))


def test_missing_file_says_where_to_get_it(tmp_path):
    with pytest.raises(CheckpointError, match=r"no sk_model\.pth.*lllyasviel/Annotators"):
        get_condition("lineart", model_path=str(tmp_path))
    with pytest.raises(CheckpointError, match=r"'./nowhere/hed\.pth' does not exist.*ControlNetHED\.pth"):
        get_condition("hed", model_path="./nowhere/hed.pth")


def test_folder_holding_the_published_name_loads(checkpoints):
    path, _ = checkpoints["lineart"]
    assert get_condition("lineart", model_path=str(path.parent)).model is not None


@pytest.mark.parametrize(
    "name, model_path, hub_id",
    [
        ("depth", None, "Intel/dpt-hybrid-midas"),
        ("hed", None, "lllyasviel/Annotators/ControlNetHED.pth"),
        ("lineart", None, "lllyasviel/Annotators/sk_model.pth"),
        ("depth", "someone/not-cached", "someone/not-cached"),
    ],
)
def test_unreachable_hub_default_fails_fast(name, model_path, hub_id, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.monotonic()
    with pytest.raises(HubUnreachableError) as err:
        get_condition(name, model_path=model_path)
    assert time.monotonic() - start < 5
    assert hub_id in str(err.value) and "model_path=" in str(err.value) and "condition.reward_model=" in str(err.value)


def test_depth_eval_default_is_dpt_large(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(HubUnreachableError, match=r"Intel/dpt-large.*condition\.eval_model=DIR"):
        get_condition("depth", purpose="eval")


def test_tiny_dpt_loads_with_its_preprocessing(conditions):
    depth = conditions["depth"]
    assert depth.input_size == (32, 32) and depth.resize_mode == "bicubic"
    assert depth.mean.flatten().tolist() == [0.5] * 3 and depth.std.flatten().tolist() == [0.5] * 3
    assert not any(p.requires_grad for p in depth.model.parameters()) and not depth.model.training


def test_depth_preprocessing_matches_the_image_processor(conditions, dpt_dir):
    from transformers import DPTImageProcessor

    depth = conditions["depth"]
    pixels = torch.randint(0, 256, (2, 32, 32, 3), dtype=torch.uint8)
    processor = DPTImageProcessor.from_pretrained(dpt_dir)
    batch = processor(images=list(pixels.numpy()), return_tensors="pt")
    with torch.no_grad():
        reference = depth.model(**batch).predicted_depth.unsqueeze(1)
        reference = torch.nn.functional.interpolate(reference, size=(32, 32), mode="bilinear", align_corners=False)
        ours = depth.predict_depth(pixels.permute(0, 3, 1, 2).float() / 255)
        control = depth(pixels.permute(0, 3, 1, 2).float() / 255)
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-4)
    # The control is the raw depth min-max scaled per sample (near = large = bright).
    raw = ours.numpy()
    expected = (raw - raw.min(axis=(1, 2, 3), keepdims=True)) / (
        raw.max(axis=(1, 2, 3), keepdims=True) - raw.min(axis=(1, 2, 3), keepdims=True)
    )
    np.testing.assert_allclose(control[:, 0:1].numpy(), expected, atol=1e-5)


def _dpt_input(condition, images: torch.Tensor) -> torch.Tensor:
    """The pixel_values the condition feeds its DPT model."""
    seen = []
    handle = condition.model.register_forward_pre_hook(
        lambda _m, _a, kw: seen.append(kw["pixel_values"]), with_kwargs=True
    )
    try:
        with torch.no_grad():
            condition.predict_depth(images)
    finally:
        handle.remove()
    return seen[0]


def test_depth_evaluation_resizes_like_the_image_processor(dpt_dir):
    """Evaluation (purpose eval) downsizes with antialiasing, as DPTImageProcessor's PIL resize does; the reward keeps
    the plain differentiable resize. 128 px noise shrunk to 32 px: PIL averages each 4x4 cell (grey), a plain
    bicubic resize samples a few pixels (noise)."""
    from transformers import DPTImageProcessor

    pixels = torch.randint(0, 256, (1, 128, 128, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    images = pixels.permute(0, 3, 1, 2).float() / 255
    reference = DPTImageProcessor.from_pretrained(dpt_dir)(images=list(pixels.numpy()), return_tensors="pt")
    reference = reference["pixel_values"]
    evaluation = get_condition("depth", model_path=str(dpt_dir), purpose="eval")
    reward = get_condition("depth", model_path=str(dpt_dir), purpose="reward")
    assert evaluation.antialias and not reward.antialias
    eval_error = (_dpt_input(evaluation, images) - reference).abs().max().item()
    reward_error = (_dpt_input(reward, images) - reference).abs().max().item()
    assert eval_error < 0.02 < 0.5 < reward_error  # PIL's uint8 rounding: 2/255 in normalised units
    # The reward path keeps its gradient.
    images.requires_grad_(True)
    reward.predict_depth(images).sum().backward()
    assert images.grad.abs().sum().item() > 0


def _stub_vae():
    """Decoder stand-in: the first three latent channels, upsampled 2x, are the image in [-1, 1]."""

    class StubVAE(torch.nn.Module):
        config = type("Config", (), {"scaling_factor": 1.0})()
        dtype = torch.float32

        def decode(self, latents, return_dict=False):
            return (torch.nn.functional.interpolate(latents[:, :3], scale_factor=2, mode="nearest"),)

    return StubVAE()


def test_depth_reward_default_is_controlnet_plus_plus_normalisation(dpt_dir):
    """Default (published): prediction / its per-sample max vs channel mean of the control / its max.
    condition.depth_reward_normalization=min_max (ours): min-max scaled prediction vs the raw 3-channel control."""
    from innercontrol.conditions import condition_options
    from innercontrol.config import load_config
    from innercontrol.reward import cycle_losses

    torch.manual_seed(0)
    x0 = torch.rand(2, 4, 16, 16) * 2 - 1
    control = torch.rand(2, 3, 32, 32) * 0.6 + 0.2
    control[:, 1] *= 0.5  # channels differ: the published label takes their mean
    default_cfg = load_config(None, ["condition.name=depth"])
    assert condition_options(default_cfg.condition) == {"reward_normalization": "max"}
    published = get_condition("depth", model_path=str(dpt_dir), **condition_options(default_cfg.condition))
    ours_cfg = load_config(None, ["condition.name=depth", "condition.depth_reward_normalization=min_max"])
    ours = get_condition("depth", model_path=str(dpt_dir), **condition_options(ours_cfg.condition))

    images = (_stub_vae().decode(x0)[0] / 2 + 0.5).clamp(0, 1)
    with torch.no_grad():
        raw = published.predict_depth(images).numpy()  # (2,1,32,32)
        got_published = cycle_losses(x0, control, _stub_vae(), published).numpy()
        got_ours = cycle_losses(x0, control, _stub_vae(), ours).numpy()
    label = control.numpy().mean(axis=1, keepdims=True)
    label = label / label.max(axis=(1, 2, 3), keepdims=True)
    prediction = raw / raw.max(axis=(1, 2, 3), keepdims=True)
    np.testing.assert_allclose(got_published, ((prediction - label) ** 2).mean(axis=(1, 2, 3)), rtol=1e-5)
    low, high = raw.min(axis=(1, 2, 3), keepdims=True), raw.max(axis=(1, 2, 3), keepdims=True)
    scaled = np.repeat((raw - low) / (high - low), 3, axis=1)
    np.testing.assert_allclose(got_ours, ((scaled - control.numpy()) ** 2).mean(axis=(1, 2, 3)), rtol=1e-5)
    assert np.abs(got_published - got_ours).min() > 1e-4  # the two objectives differ
    with pytest.raises(Exception, match="depth_reward_normalization"):
        load_config(None, ["condition.depth_reward_normalization=mean"])


@pytest.mark.parametrize("name", ["depth", "hed", "lineart", "canny"])
def test_control_shape_range_and_gradient(name, conditions):
    cond = conditions[name]
    assert cond.name == name
    torch.manual_seed(0)
    images = torch.rand(2, 3, 34, 40)
    images[:, :, 10:24, 12:30] = 0.9  # a bright square gives every model an edge to see
    images.requires_grad_(True)
    control = cond(images)
    assert control.shape == (2, 3, 34, 40) and control.dtype == torch.float32
    assert 0.0 <= control.min().item() and control.max().item() <= 1.0
    assert control.std().item() > 0
    assert torch.equal(control[:, 0], control[:, 1]) and torch.equal(control[:, 0], control[:, 2])
    (control * torch.rand_like(control)).sum().backward()
    grad = images.grad.abs().sum()
    assert torch.isfinite(images.grad).all() and grad.item() > 0
    with pytest.raises(ValueError, match=r"expected RGB images \(B,3,H,W\)"):
        cond(torch.rand(2, 1, 32, 32))


def test_hed_is_sigmoid_of_mean_side_output(conditions):
    hed = conditions["hed"]
    images = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        sides = hed.model(images * 255)
        control = hed(images)
    assert [tuple(s.shape[-2:]) for s in sides] == [(32, 32), (16, 16), (8, 8), (4, 4), (2, 2)]
    upsampled = [torch.nn.functional.interpolate(s, size=(32, 32), mode="bilinear") for s in sides]
    expected = 1 / (1 + np.exp(-np.mean([u.numpy() for u in upsampled], axis=0)))
    np.testing.assert_allclose(control[:, :1].numpy(), expected, atol=1e-6)


def test_lineart_is_inverted_generator_output(conditions):
    lineart = conditions["lineart"]
    images = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        drawing = lineart.model(images)
        control = lineart(images)
    assert drawing.shape == (1, 1, 32, 32)
    np.testing.assert_allclose(control.numpy(), np.repeat(1 - drawing.numpy(), 3, axis=1), atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# Normalisations (DESIGN 3) against numpy


def test_depth_normalisations(conditions):
    x = torch.rand(3, 3, 8, 8)
    x[1] *= 0.2
    ref = x.numpy().mean(axis=1, keepdims=True)
    ref = ref / ref.max(axis=(1, 2, 3), keepdims=True)
    depth = conditions["depth"]
    np.testing.assert_allclose(depth.normalize_probe_output(x).numpy(), ref, rtol=1e-6)
    np.testing.assert_allclose(depth.normalize_label(x).numpy(), ref, rtol=1e-6)
    zeros = depth.normalize_label(torch.zeros(1, 3, 4, 4))  # guarded division: no NaN
    assert torch.equal(zeros, torch.zeros(1, 1, 4, 4))


def test_lineart_normalisations(conditions):
    x = torch.rand(3, 3, 8, 8) * 0.5 + 0.2
    mean = x.numpy().mean(axis=1, keepdims=True)
    low, high = mean.min(axis=(1, 2, 3), keepdims=True), mean.max(axis=(1, 2, 3), keepdims=True)
    lineart = conditions["lineart"]
    # Prediction and label in one space (white lines): the prediction min-max scaled, the label the control, neither
    # inverted. (The published code inverts the prediction and compares it with the dark-line drawing 1 - control:
    # the same differences with the sign flipped.)
    np.testing.assert_allclose(lineart.normalize_probe_output(x).numpy(), (mean - low) / (high - low), atol=1e-6)
    np.testing.assert_allclose(lineart.normalize_label(x).numpy(), mean, rtol=1e-6)
    flat = lineart.normalize_probe_output(torch.full((1, 3, 4, 4), 0.3))
    assert torch.isfinite(flat).all()


def _structured_control(batch: int = 2, size: int = 16) -> torch.Tensor:
    """Controls spanning exactly [0, 1]: a horizontal ramp with a bright square, a white-line grid for line maps."""
    ramp = torch.linspace(0, 1, size).view(1, 1, 1, size).expand(1, 3, size, size).clone()
    ramp[..., 4:9, 4:9] = 1.0
    lines = torch.zeros(1, 3, size, size)
    lines[..., ::4, :] = 1.0
    lines[..., :, ::5] = 1.0
    return torch.cat([ramp, lines][:batch])


@pytest.mark.parametrize("name", ["depth", "hed", "lineart", "canny"])
def test_alignment_round_trip_probe_reading_the_control(conditions, name):
    """A probe output equal to the control in the probe's own output space (it is trained on the control: output
    2 * control - 1) has alignment error ~0; the inverted control has a large one."""
    from innercontrol.losses import alignment_error

    condition = conditions[name]
    control = _structured_control()
    exact = alignment_error(2 * control - 1, control, condition)
    inverse = alignment_error(2 * (1 - control) - 1, control, condition)
    assert exact.shape == (2,) and exact.max().item() < 1e-10
    assert inverse.min().item() > 0.1


def test_hed_normalisations(conditions):
    hed = conditions["hed"]
    x = torch.rand(2, 3, 8, 8)
    assert torch.equal(hed.normalize_probe_output(x), x)
    single = torch.rand(2, 1, 8, 8)
    np.testing.assert_array_equal(hed.normalize_label(single).numpy(), np.repeat(single.numpy(), 3, axis=1))
    assert torch.equal(hed.normalize_label(x), x)


# ---------------------------------------------------------------------------------------------------------------
# Canny: binary edges for F1


def _dilate(mask: np.ndarray) -> np.ndarray:
    """Pixels within one pixel (8-neighbourhood) of a True pixel."""
    padded = np.pad(mask.astype(bool), 1)
    height, width = mask.shape
    return np.any([padded[dy : dy + height, dx : dx + width] for dy in range(3) for dx in range(3)], axis=0)


# Non-maximum suppression breaks the tie between the two pixels either side of a step edge (equal magnitudes) by a
# float comparison whose outcome differs between processors, so the canny tests accept the edge on either pixel.


def test_canny_step_edge_and_thresholds(conditions):
    canny = conditions["canny"]
    step = torch.zeros(1, 3, 16, 16)
    step[..., 8:] = 1.0
    edges = canny.binary_edges(step)[0, 0].numpy()
    columns = sorted(set(np.nonzero(edges)[1].tolist()))
    assert columns in ([7], [8])  # the last dark or the first bright column, full height, nothing else
    expected = np.zeros((16, 16))
    expected[:, columns[0]] = 1
    np.testing.assert_array_equal(edges, expected)
    # kornia's magnitude of a unit step is 2.587: contrast 0.1 -> 0.26 > high 0.2 (an edge), 0.05 -> 0.13 (none)
    assert canny.binary_edges(step * 0.1)[0, 0].sum() == 16
    assert canny.binary_edges(step * 0.05).sum() == 0
    edges = canny.binary_edges(torch.cat([step, step * 0.05]))
    assert edges.shape == (2, 1, 16, 16) and set(edges.unique().tolist()) <= {0.0, 1.0}
    # The differentiable map: magnitude / its max, so the edge column is 1 and the rest 0.
    np.testing.assert_allclose(canny(step)[0, 0].numpy(), expected, atol=1e-6)


def test_canny_white_square_f1_against_hand_count(conditions):
    canny = conditions["canny"]
    image = torch.zeros(1, 3, 32, 32)
    image[..., 8:24, 8:24] = 1.0  # rows/cols 8..23
    edges = canny.binary_edges(image)[0, 0].numpy().astype(bool)
    # Each straight side (positions 11..20, away from the corners the 5x5 Gaussian rounds) is found as exactly one
    # pixel, just outside or just inside the square: a one-pixel band either side of the true boundary.
    sides = {
        "top": edges[7:9, 11:21],
        "bottom": edges[23:25, 11:21],
        "left": edges[11:21, 7:9].T,
        "right": edges[11:21, 23:25].T,
    }
    for name, band in sides.items():
        assert (band.sum(axis=0) == 1).all(), f"{name} side: not exactly one edge pixel per position"
    # Nothing away from the boundary: the 2-pixel band around it (rows/cols 7..8 and 23..24) plus the corners.
    band = np.zeros((32, 32), dtype=bool)
    band[6:26, 6:26] = True
    band[10:22, 10:22] = False
    assert not edges[~band].any()
    # F1 with a one-pixel tolerance against the hand-drawn ring just outside the square (4 * 18 - 4 = 68 pixels):
    # an edge pixel counts as correct when a ring pixel is within one pixel, a ring pixel as found when an edge pixel
    # is; by hand every edge pixel lies on or next to the ring and every ring pixel (the corners too) has one.
    ring = np.zeros((32, 32), dtype=bool)
    ring[7:25, 7:25] = True
    ring[8:24, 8:24] = False
    assert ring.sum() == 68 and 40 <= edges.sum() <= 68
    precision = (edges & _dilate(ring)).sum() / edges.sum()
    recall = (ring & _dilate(edges)).sum() / ring.sum()
    assert precision == 1.0 and recall == 1.0
    # Without tolerance the metric module's F1 equals the count 2 TP / (|edges| + |ring|).
    strict = edge_f1(torch.from_numpy(edges)[None].float(), torch.from_numpy(ring)[None].float())
    assert strict.item() == pytest.approx(2 * (edges & ring).sum() / (edges.sum() + ring.sum()))


@pytest.mark.parametrize("trust_pickle", [False, True])
def test_random_bytes_are_not_a_checkpoint(tmp_path, trust_pickle):
    path = tmp_path / "ControlNetHED.pth"
    path.write_bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0)).byte().numpy())
    with pytest.raises(CheckpointError, match=r"ControlNetHED\.pth is not a torch checkpoint.*lllyasviel/Annotators"):
        get_condition("hed", model_path=str(path), trust_pickle=trust_pickle)
