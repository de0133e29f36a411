"""Regional torch.compile (innercontrol.speed): the same loss and gradients as eager, taps intact, no recompiles."""

import copy

import pytest
import torch


@pytest.fixture(scope="module")
def tiny_models(tiny_dir):
    from diffusers import ControlNetModel, UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(tiny_dir, subfolder="unet")
    controlnet = ControlNetModel.from_pretrained(tiny_dir, subfolder="controlnet")
    # Nonzero zero-convolutions, so the ControlNet's gradients depend on the whole path through the UNet.
    torch.manual_seed(0)
    with torch.no_grad():
        for block in [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block]:
            block.weight.normal_(0, 0.05)
    return unet, controlnet


def step(unet, controlnet, inputs):
    from innercontrol.controlled_unet import ControlledUNet

    controlnet.zero_grad(set_to_none=True)
    out = ControlledUNet(unet, controlnet, tap="attn")(*inputs)
    loss = out.noise_pred.pow(2).mean() + sum(f.float().pow(2).mean() for f in out.features)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in controlnet.named_parameters() if p.grad is not None}
    return loss.detach(), [f.detach() for f in out.features], grads


def make_inputs(unet, seed):
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(2, unet.config.in_channels, 8, 8, generator=g)
    text = torch.randn(2, 77, unet.config.cross_attention_dim, generator=g)
    control = torch.rand(2, 3, 64, 64, generator=g)
    return latents, torch.tensor([10, 700]), text, control


def test_compiled_blocks_match_eager_and_do_not_recompile(tiny_models, monkeypatch):
    import torch._dynamo

    from innercontrol.controlled_unet import tapped_modules
    from innercontrol.speed import compile_blocks

    unet, controlnet = tiny_models
    unet_c, controlnet_c = copy.deepcopy(unet), copy.deepcopy(controlnet)
    torch._dynamo.reset()
    compiled = compile_blocks(unet_c, keep_eager=tapped_modules(unet_c, "attn")) + compile_blocks(controlnet_c)
    assert compiled > 0
    assert unet_c.state_dict().keys() == unet.state_dict().keys()  # saved weights keep their names

    for seed in (0, 1):
        inputs = make_inputs(unet, seed)
        loss, features, grads = step(unet, controlnet, inputs)
        loss_c, features_c, grads_c = step(unet_c, controlnet_c, inputs)
        torch.testing.assert_close(loss_c, loss, rtol=1e-4, atol=1e-5)
        assert len(features_c) == len(features) == len(tapped_modules(unet, "attn"))  # every tap still fires
        for a, b in zip(features_c, features):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
        assert grads_c.keys() == grads.keys() and len(grads) > 0
        for name in grads:
            torch.testing.assert_close(grads_c[name], grads[name], rtol=1e-3, atol=1e-5, msg=name)
        if seed == 0:
            # The taps' hooks are new on every call; they run outside the compiled forwards, so nothing recompiles.
            monkeypatch.setattr(torch._dynamo.config, "error_on_recompile", True)


def test_a_block_holding_a_tap_stays_eager_but_its_attention_is_compiled(tiny_models):
    from innercontrol.controlled_unet import tapped_modules
    from innercontrol.speed import compile_blocks

    unet = copy.deepcopy(tiny_models[0])
    taps = tapped_modules(unet, "attn")
    compile_blocks(unet, keep_eager=taps)
    compiled = lambda m: "forward" in vars(m)  # noqa: E731  (an instance-level forward: the compiled one)
    holders = [a.transformer_blocks[0] for block in unet.up_blocks for a in getattr(block, "attentions", None) or []]
    assert len(holders) == len(taps) > 0
    for holder, tap in zip(holders, taps):
        assert tap is holder.attn1 and not compiled(holder) and compiled(tap) and compiled(holder.ff)
    assert all(compiled(r) for block in unet.up_blocks for r in block.resnets)
    assert all(
        compiled(b)
        for block in unet.down_blocks
        for a in getattr(block, "attentions", [])
        for b in a.transformer_blocks
    )


def test_the_ema_copy_of_a_compiled_controlnet_runs_its_own_weights(tiny_models):
    """A deepcopy keeps compiled forwards bound to the original's blocks; the EMA shadow must drop them."""
    from innercontrol.speed import compile_blocks
    from innercontrol.train import EMA

    net = copy.deepcopy(tiny_models[1])
    compile_blocks(net)
    shadow = EMA(net, 0.9).shadow
    assert any("forward" in vars(m) for m in net.modules())  # the trained ControlNet stays compiled
    assert not any("forward" in vars(m) for m in shadow.modules())
    block = shadow.down_blocks[0].resnets[0]
    x, emb = torch.randn(1, block.in_channels, 8, 8), torch.randn(1, block.time_emb_proj.in_features)
    with torch.no_grad():
        before = block(x, emb)
        for p in net.parameters():
            p.add_(1.0)  # the original moves; the shadow must not follow it
        torch.testing.assert_close(block(x, emb), before, rtol=0, atol=0)
