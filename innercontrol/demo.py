"""The embedded tiny default, end to end, offline on the CPU.

    python -m innercontrol.demo --out outputs/demo      (what `make demo` runs)

Stages that exist so far: tiny pipeline -> one controlled generation. Later stages (synthetic data,
probe pretraining, aligned training, evaluation) are added here as they land.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="outputs/demo", help="folder for every output of the demo")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.time()

    import torch
    from diffusers import StableDiffusionControlNetPipeline

    from innercontrol.tiny import TINY_RESOLUTION, write_tiny

    print("[1/2] tiny SD1.5-shaped pipeline", flush=True)
    tiny = write_tiny(out / "tiny")
    print("[2/2] controlled generation with the tiny pipeline", flush=True)
    pipe = StableDiffusionControlNetPipeline.from_pretrained(tiny)
    control = torch.linspace(0, 1, TINY_RESOLUTION).view(1, 1, 1, -1).expand(1, 3, TINY_RESOLUTION, TINY_RESOLUTION)
    image = pipe(
        "a red circle in front of a blue square",
        image=control,
        num_inference_steps=4,
        height=TINY_RESOLUTION,
        width=TINY_RESOLUTION,
        generator=torch.Generator().manual_seed(0),
    ).images[0]
    image.save(out / "sample.png")
    print(f"done in {time.time() - start:.0f} s: tiny pipeline in {tiny}, sample image {out / 'sample.png'}")


if __name__ == "__main__":
    main()
