"""CUDA-only checks (skipped without a GPU): the reward replayed from a CUDA graph equals the eager reward."""

import pytest
import torch

from innercontrol import reward as reward_module
from innercontrol.losses import reward_loss
from innercontrol.reward import SplitReward

from .helpers import load_tiny_components

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _reward_models(tiny_dir, dtype):
    from innercontrol.conditions import get_condition

    _, _, vae, scheduler = load_tiny_components(tiny_dir)
    vae = vae.requires_grad_(False).to("cuda", dtype)
    condition = get_condition("depth", model_path=str(tiny_dir / "dpt"), device="cuda", purpose="reward")
    condition.to(dtype=dtype)
    return vae, condition, scheduler


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_graph_replayed_reward_equals_the_eager_reward(tiny_dir, dtype):
    vae, condition, scheduler = _reward_models(tiny_dir, dtype)
    graphed = SplitReward(vae, condition, cuda_graph=True)
    eager = SplitReward(vae, condition, cuda_graph=False)
    torch.manual_seed(0)
    noisy = torch.randn(4, 4, 16, 16, device="cuda")
    control = torch.rand(4, 3, 128, 128, device="cuda")
    for timesteps in ([50, 600, 150, 999], [10, 900, 900, 900], [1, 2, 3, 4]):
        t = torch.tensor(timesteps)
        results = []
        for split in (graphed, eager, None):
            pred = torch.randn(4, 4, 16, 16, device="cuda", generator=torch.Generator("cuda").manual_seed(1))
            pred.requires_grad_(True)
            loss, count = reward_loss(
                noisy, pred, t.cuda(), control, vae, condition, scheduler.alphas_cumprod.cuda(), (0, 200), split=split
            )
            (grad,) = torch.autograd.grad(loss, pred)
            results.append((loss.item(), grad, count))
        (g_loss, g_grad, count), (e_loss, e_grad, _), (d_loss, d_grad, _) = results
        assert count == sum(x <= 200 for x in timesteps)
        assert g_loss == pytest.approx(e_loss, rel=1e-5) and g_loss == pytest.approx(d_loss, rel=1e-2)
        assert g_grad.abs().sum() > 0
        tolerance = dict(rtol=1e-4, atol=1e-8) if dtype == torch.float32 else dict(rtol=2e-2, atol=1e-6)
        assert torch.allclose(g_grad, e_grad, **tolerance)
        assert torch.allclose(g_grad, d_grad, **tolerance) or dtype != torch.float32
    assert graphed.capture_error is None and len(graphed.graphs) == 1 and graphed.graph_pool_bytes > 0
    assert not eager.graphs


def test_fp16_training_with_graph_reward_runs_and_captures_once(tiny_dir, tmp_path, monkeypatch):
    from innercontrol.synthetic import write_synthetic

    from .test_train import overrides, run_train, weights

    captures = []
    original = reward_module._CapturedPass.__init__

    def counting(self, *args, **kwargs):
        captures.append(1)
        original(self, *args, **kwargs)

    monkeypatch.setattr(reward_module._CapturedPass, "__init__", counting)
    write_synthetic(tmp_path / "data", num=8, resolution=64, seed=0, val_fraction=0.25)
    ws = {"tiny": tiny_dir, "data": tmp_path / "data", "probe": tmp_path / "none"}
    args = overrides(ws, tmp_path / "run", 2, "optim.mixed_precision=fp16", "loss.alignment_weight=0")
    args = [a for a in args if not a.startswith("probe.path")]
    run_train(args)
    assert captures == [1]  # one capture, replayed for every in-window sample of every step
    final = weights(tmp_path / "run" / "controlnet")
    assert all(torch.isfinite(v).all() for v in final.values())
