"""Throughput switches of the training step (issue 16): regional torch.compile and channels_last.

    compiled = compile_blocks(unet, keep_eager=tapped_modules(unet, "attn"))   # before accelerator.prepare
    compile_blocks(controlnet)

Regional compilation compiles the forward of each ResNet and transformer block on its own: small graphs, one per
block shape (blocks of the same shape share it; compile_blocks raises dynamo's recompile limit so every shape gets
its own), so compile time stays seconds to a minute where the whole UNet would take many. The module call stays eager, so forward hooks (the probe's taps), gradient checkpointing and
state-dict keys are unchanged. A block holding a tapped module is not compiled whole (the taps' hooks change on
every call and would force recompiles); its children are, the tapped module's own forward included.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn


def block_types() -> tuple[type, ...]:
    """The diffusers blocks compiled one by one: ResNet blocks and transformer blocks."""
    from diffusers.models.attention import BasicTransformerBlock
    from diffusers.models.resnet import ResnetBlock2D

    return (ResnetBlock2D, BasicTransformerBlock)


def compile_blocks(model: nn.Module, keep_eager: Iterable[nn.Module] = (), **compile_kwargs) -> int:
    """Replace the forward of every block of `model` by its torch.compile'd version; returns how many were compiled.

    keep_eager: modules whose hooks must see every call (e.g. the tapped decoder modules): a block containing one
    is not compiled whole; its attention and feed-forward children are, the tapped module itself too when it is
    one (its hooks run outside its compiled forward). A ResNet block holding a tapped conv stays eager."""
    # Blocks of one class share a compiled code object; each distinct shape (SD1.5: 12 ResNet channel pairs, times
    # the spatial sizes, times grad / no-grad) is one more entry, well past torch's default limit of 8.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    protected = {id(m) for m in keep_eager}
    containing = set()  # ids of modules with a protected module strictly inside them
    for module in model.modules():
        if any(id(child) in protected for child in module.modules() if child is not module):
            containing.add(id(module))
    kinds = block_types()
    count = 0

    def composite(module: nn.Module) -> bool:  # e.g. an attention or a feed-forward, not a single conv or norm
        return sum(1 for m in module.modules() if not list(m.children()) and any(True for _ in m.parameters())) > 1

    def visit(module: nn.Module, inside_block: bool) -> None:
        nonlocal count
        free = id(module) not in containing
        if free and (isinstance(module, kinds) or (inside_block and composite(module))):
            module.forward = torch.compile(module.forward, **compile_kwargs)
            count += 1
            return
        for child in module.children():
            visit(child, inside_block or isinstance(module, kinds))

    visit(model, False)
    return count


def uncompiled(model: nn.Module) -> nn.Module:
    """Drop the compiled forwards compile_blocks set on `model`'s blocks (in place; returns it). A deepcopy of a
    compiled model keeps wrappers bound to the original's blocks, so a copy (e.g. the EMA) must drop them."""
    for module in model.modules():
        module.__dict__.pop("forward", None)
    return model


def to_channels_last(*modules: nn.Module) -> None:
    """Convolution weights in channels_last memory format (NHWC), which cuDNN and inductor run faster on recent GPUs."""
    for module in modules:
        module.to(memory_format=torch.channels_last)
