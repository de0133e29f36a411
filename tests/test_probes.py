import json
from pathlib import Path

import pytest
import torch

from innercontrol.probes import ControlProbe, ProbeLoadError, build_probe, load_probe

SPECS = Path(__file__).resolve().parent / "specs"  # copies of ../shared/reference/checkpoint_specs


def _spec(kind):
    path = SPECS / f"probe_sd15_{kind}.json"
    if not path.exists():
        pytest.skip(f"{path} not available")
    return json.loads(path.read_text())


def _write_published(spec, path, sequential=False):
    torch.manual_seed(0)
    state = {}
    for key, shape in spec["state_dict"].items():
        if sequential and key.startswith("bottleneck_layers."):
            head, index, rest = key.split(".", 2)
            key = f"{head}.{index}.0.{rest}"
        state[key] = torch.randn(shape) * 0.02
    config = dict(spec["example_config"])
    if sequential:  # as published: the emb_layers keys stay (the network always creates them)
        config["aggregation_kwargs"] = dict(config["aggregation_kwargs"], bottleneck_sequential=True)
    torch.save({"config": config, "aggregation_network": state, "step": 5000}, path)
    return state


@pytest.mark.parametrize("kind", ["attn", "conv"])
def test_published_checkpoint_loads_strictly_and_runs(tmp_path, kind):
    spec = _spec(kind)
    state = _write_published(spec, tmp_path / "probe.pt")
    probe = load_probe(tmp_path / "probe.pt", timestep_input="t")
    assert sum(p.numel() for p in probe.parameters()) == spec["num_params"]
    assert all(torch.equal(probe.state_dict()[k], v) for k, v in state.items())
    # SD1.5 taps at 128 px: 1280 @4, 640 @8, 320 @16 (conv adds 1280 @2).
    sizes = {1280: 4, 640: 8, 320: 16}
    features = [torch.randn(2, c, sizes[c], sizes[c]) for c in spec["feature_dims"]]
    with torch.no_grad():
        out = probe(features, torch.randn(2, 1280))
    assert out.shape == (2, 3, 16, 16)
    assert out.abs().max() <= 1


def test_sequential_published_checkpoint_loads_with_warning(tmp_path):
    spec = _spec("attn")
    state = _write_published(spec, tmp_path / "seq.pt", sequential=True)
    assert any(".0.emb_layers." in k for k in state)  # the published layout carries the unused time layers
    with pytest.warns(UserWarning, match="ignore the timestep"):
        probe = load_probe(tmp_path / "seq.pt", timestep_input="t")
    loaded = probe.state_dict()
    assert set(loaded) == set(state) and all(torch.equal(loaded[k], v) for k, v in state.items())
    features = [torch.randn(1, c, 4, 4) for c in spec["feature_dims"]]
    with torch.no_grad():
        a = probe(features, torch.zeros(1, 1280))
        b = probe(features, torch.ones(1, 1280) * 5)
    assert torch.equal(a, b)


def test_published_file_warns_about_readout_guidance_step_index(tmp_path):
    """A published .pt is read with the real t after a warning naming probe.timestep_input; step_index heads embed
    999 - t (Readout Guidance's training convention); our folders keep their own setting, silently."""
    import warnings

    spec = _spec("attn")
    _write_published(spec, tmp_path / "probe.pt")
    with pytest.warns(UserWarning, match=r"999 - t.*probe\.timestep_input=step_index"):
        probe = load_probe(tmp_path / "probe.pt")
    assert probe.config.timestep_input == "t"
    t = torch.tensor([0, 250, 999])
    assert torch.equal(probe.probe_timesteps(t), t)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rg_head = load_probe(tmp_path / "probe.pt", timestep_input="step_index")
        assert torch.equal(rg_head.probe_timesteps(t), torch.tensor([999, 749, 0]))
        rg_head.save_pretrained(tmp_path / "rg")
        assert load_probe(tmp_path / "rg").config.timestep_input == "step_index"
    with pytest.raises(ProbeLoadError, match="timestep_input"):
        load_probe(tmp_path / "rg", timestep_input="index")


def test_mismatched_checkpoint_names_keys_and_shapes(tmp_path):
    spec = _spec("attn")
    state = _write_published(spec, tmp_path / "ok.pt")
    config = spec["example_config"]
    broken = dict(state)
    broken["bottleneck_layers.0.conv1.weight"] = torch.randn(96, 1000, 1, 1)
    torch.save({"config": config, "aggregation_network": broken}, tmp_path / "shape.pt")
    with pytest.raises(
        ProbeLoadError, match=r"bottleneck_layers.0.conv1.weight: expected \(96, 1280, 1, 1\), found \(96, 1000"
    ):
        load_probe(tmp_path / "shape.pt")
    del broken["mixing_weights"]
    torch.save({"config": config, "aggregation_network": broken}, tmp_path / "missing.pt")
    with pytest.raises(ProbeLoadError, match="missing keys.*mixing_weights"):
        load_probe(tmp_path / "missing.pt")
    torch.save(state, tmp_path / "bare.pt")
    with pytest.raises(ProbeLoadError, match="expected a dict with 'config' and 'aggregation_network'"):
        load_probe(tmp_path / "bare.pt")
    with pytest.raises(ProbeLoadError, match="does not exist"):
        load_probe(tmp_path / "nothing.pt")


def test_wrong_features_name_expected_and_found_channels(tmp_path):
    spec = _spec("attn")
    _write_published(spec, tmp_path / "probe.pt")
    probe = load_probe(tmp_path / "probe.pt")
    conv_like = [torch.randn(1, c, 4, 4) for c in [1280] * 6 + [640] * 3 + [320] * 3]
    with pytest.raises(ProbeLoadError, match=r"expects 9 tapped maps with channels \[1280.*found 12 with channels"):
        probe(conv_like, torch.randn(1, 1280))


class _Unpicklable:
    pass


def test_pickle_needing_file_is_refused_unless_trusted(tmp_path):
    spec = _spec("attn")
    state = _write_published(spec, tmp_path / "probe.pt")
    torch.save(
        {"config": spec["example_config"], "aggregation_network": state, "extra": _Unpicklable()}, tmp_path / "p.pt"
    )
    with pytest.raises(ProbeLoadError, match=r"p.pt.*probe.trust_pickle=true"):
        load_probe(tmp_path / "p.pt")
    assert isinstance(load_probe(tmp_path / "p.pt", trust_pickle=True), ControlProbe)


def test_own_format_round_trip(tmp_path):
    torch.manual_seed(0)
    probe = build_probe([16, 32, 64], projection_dim=32, timestep_embedding_dim=64, tap="attn", condition="depth")
    with torch.no_grad():
        probe.mixing_weights.copy_(torch.tensor([0.1, 0.5, -0.2]))
    probe.save_pretrained(tmp_path / "probe")
    assert sorted(p.name for p in (tmp_path / "probe").iterdir()) == ["probe.safetensors", "probe_config.json"]
    loaded = load_probe(tmp_path / "probe")
    assert loaded.config.tap == "attn" and loaded.config.condition == "depth"
    features = [torch.randn(2, 16, 4, 4), torch.randn(2, 32, 8, 8), torch.randn(2, 64, 16, 16)]
    temb = torch.randn(2, 64)
    with torch.no_grad():
        assert torch.equal(probe.eval()(features, temb), loaded(features, temb))


def test_probe_mixes_layers_with_softmax_weights():
    torch.manual_seed(0)
    probe = build_probe([8, 8], projection_dim=16, timestep_embedding_dim=4).eval()
    features = [torch.randn(1, 8, 4, 4), torch.randn(1, 8, 4, 4)]
    temb = torch.randn(1, 4)
    with torch.no_grad():
        probe.mixing_weights.copy_(torch.tensor([0.0, 1.0]))
        w = torch.softmax(torch.tensor([0.0, 1.0]), 0)
        mixed = w[0] * probe.bottleneck_layers[0](features[0], temb) + w[1] * probe.bottleneck_layers[1](
            features[1], temb
        )
        assert torch.allclose(probe(features, temb), probe.output_head(mixed))
        # The time embedding changes the output of a timestep-conditioned probe.
        assert not torch.allclose(probe(features, temb), probe(features, temb + 1))


def test_probe_gradient_reaches_features():
    torch.manual_seed(0)
    probe = build_probe([8, 16], projection_dim=16, timestep_embedding_dim=4)
    features = [torch.randn(1, 8, 4, 4, requires_grad=True), torch.randn(1, 16, 8, 8, requires_grad=True)]
    out = probe(features, torch.randn(1, 4))
    assert out.shape == (1, 3, 8, 8)
    out.sum().backward()
    assert all(f.grad.abs().sum() > 0 for f in features)


def test_resizing_after_1x1_convs_equals_resizing_features_first():
    import torch.nn.functional as F

    torch.manual_seed(0)
    probe = build_probe([64, 16], projection_dim=16, timestep_embedding_dim=4).eval()
    features = [torch.randn(2, 64, 4, 4), torch.randn(2, 16, 8, 8)]
    temb = torch.randn(2, 4)
    with torch.no_grad():
        w = torch.softmax(probe.mixing_weights, 0)
        upsampled = [F.interpolate(f, size=(8, 8), mode="bilinear", align_corners=False) for f in features]
        naive = sum(wi * block(f, temb) for wi, block, f in zip(w, probe.bottleneck_layers, upsampled))
        assert torch.allclose(probe(features, temb), probe.output_head(naive), atol=1e-5)


@pytest.mark.parametrize("trust_pickle", [False, True])
def test_random_bytes_are_reported_as_not_a_checkpoint(tmp_path, trust_pickle):
    corrupt = tmp_path / "readout_depth.pt"
    corrupt.write_bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0)).byte().numpy())
    with pytest.raises(ProbeLoadError, match=r"probe file '.*readout_depth.pt' is not a checkpoint") as err:
        load_probe(corrupt, trust_pickle=trust_pickle)
    assert "trust_pickle" not in str(err.value)  # following that advice would not help
    # A zip archive cut short (a broken download) is one too.
    spec = _spec("attn")
    _write_published(spec, tmp_path / "probe.pt")
    cut = tmp_path / "cut.pt"
    cut.write_bytes((tmp_path / "probe.pt").read_bytes()[:5000])
    with pytest.raises(ProbeLoadError, match=r"probe file '.*cut.pt' is not a checkpoint"):
        load_probe(cut, trust_pickle=trust_pickle)


def test_corrupt_probe_folder_names_the_file(tmp_path):
    build_probe([8, 16], 16, 32).save_pretrained(tmp_path / "probe")
    weights = tmp_path / "probe" / "probe.safetensors"
    weights.write_bytes(b"\xff" * 64)
    with pytest.raises(ProbeLoadError, match=r"'.*probe.safetensors' is not a safetensors checkpoint"):
        load_probe(tmp_path / "probe")
    (tmp_path / "probe" / "probe_config.json").write_text("{not json")
    with pytest.raises(ProbeLoadError, match=r"'.*probe_config.json' is not a probe config"):
        load_probe(tmp_path / "probe")
