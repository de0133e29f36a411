"""Write inference.ipynb from the cells below (edit here, then run: python scripts/make_notebook.py)."""

from pathlib import Path

import nbformat as nbf

CELLS = [
    (
        "md",
        """# InnerControl inference

Load Stable Diffusion 1.5 with an InnerControl ControlNet, compute the control from an image with the condition
models, generate, compare the input control with the control re-extracted from the generated images, and watch
what the control-prediction probe reads from the UNet at a few sampling steps.

`TINY = True` runs everything offline on the CPU with the tiny pipeline (`python -m innercontrol.tiny`), in
seconds; set `TINY = False` on a GPU (e.g. Colab) for SD1.5 and real weights.""",
    ),
    (
        "code",
        """import os
import subprocess
import sys

TINY = True  # False: SD1.5 + a real InnerControl ControlNet on a GPU

# On Colab: fetch this codebase and install what Colab lacks (skipped when run from a checkout).
REPO_URL = os.environ.get("INNERCONTROL_REPO", "")  # the git URL of your copy of this codebase
if "google.colab" in sys.modules and not os.path.isdir("innercontrol"):
    if not REPO_URL:
        raise RuntimeError("set REPO_URL (or the INNERCONTROL_REPO variable) to the git URL of this codebase")
    subprocess.run(["git", "clone", "-q", REPO_URL, "innercontrol_repo"], check=True)
    os.chdir("innercontrol_repo")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "-r", "requirements.txt"], check=True)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "-e", "."], check=True)
if TINY:
    os.environ["HF_HUB_OFFLINE"] = "1"  # read at import by the HF libraries
sys.path.insert(0, os.getcwd())""",
    ),
    (
        "code",
        """import torch

PROMPT = "a red circle in front of a blue square on a striped background"
IMAGE = None  # path of your own image to take the control from; None = a synthetic scene
SEED = 42
if TINY:
    from innercontrol.tiny import write_tiny

    tiny = write_tiny("outputs/notebook_tiny")
    BASE_MODEL, CONTROLNET = str(tiny), str(tiny / "controlnet")
    CONDITION, CONDITION_MODEL = "depth", str(tiny / "dpt")
    # The probe of `python -m innercontrol.demo --model tiny` (make demo's own probe is the miniature's).
    DEMO = "outputs/demo/demo.json"
    TINY_DEMO = os.path.isfile(DEMO) and '"tiny"' in open(DEMO).read()
    PROBE = "outputs/demo/probe" if TINY_DEMO and os.path.isdir("outputs/demo/probe") else None
    RESOLUTION, STEPS, DEVICE, DTYPE = 128, 8, "cpu", torch.float32
else:
    BASE_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"
    CONTROLNET = "outputs/aligned_depth/controlnet_ema"  # hub id or folder of your InnerControl ControlNet
    CONDITION, CONDITION_MODEL = "depth", None  # None: the published condition model (DPT-Hybrid for depth)
    PROBE = "checkpoints/probes/depth"  # probe folder (train/train_probes.sh) or a published .pt
    RESOLUTION, STEPS, DEVICE, DTYPE = 512, 20, "cuda", torch.float16
print(BASE_MODEL, CONTROLNET, CONDITION, PROBE)""",
    ),
    (
        "code",
        """from diffusers import ControlNetModel, StableDiffusionControlNetPipeline, UniPCMultistepScheduler

from innercontrol.hub import resolve_model

controlnet = ControlNetModel.from_pretrained(resolve_model(CONTROLNET, "ControlNet"), torch_dtype=DTYPE)
pipe = StableDiffusionControlNetPipeline.from_pretrained(
    resolve_model(BASE_MODEL), controlnet=controlnet, torch_dtype=DTYPE, safety_checker=None,
    requires_safety_checker=False,
).to(DEVICE)
pipe.scheduler = UniPCMultistepScheduler.from_config(pipe.scheduler.config)
pipe.set_progress_bar_config(disable=True)""",
    ),
    (
        "code",
        """import numpy as np
from PIL import Image

from innercontrol.conditions import get_condition

condition = get_condition(CONDITION, model_path=CONDITION_MODEL, device=DEVICE, purpose="eval")
if IMAGE is None:
    from innercontrol.synthetic import render_scene

    pixels, _, caption = render_scene(3, RESOLUTION, seed=0)
    source = Image.fromarray(pixels)
else:
    source = Image.open(IMAGE).convert("RGB").resize((RESOLUTION, RESOLUTION), Image.BICUBIC)
image = torch.from_numpy(np.asarray(source, dtype=np.float32) / 255).permute(2, 0, 1)[None].to(DEVICE)
with torch.no_grad():
    control = condition(image).float()  # (1, 3, H, W) in [0, 1]""",
    ),
    (
        "code",
        """import matplotlib.pyplot as plt

generators = [torch.Generator().manual_seed(SEED + i) for i in range(4)]
with torch.no_grad():
    images = pipe(
        [PROMPT] * 4, image=control.to(DTYPE).expand(4, -1, -1, -1), num_inference_steps=STEPS, guidance_scale=7.5,
        negative_prompt=["worst quality, low quality"] * 4, height=RESOLUTION, width=RESOLUTION,
        generator=generators, output_type="pt",
    ).images.float()
    reextracted = condition(images.to(DEVICE)).float().cpu()

def show(ax, tensor, title):
    ax.imshow(tensor.permute(1, 2, 0).clamp(0, 1).numpy())
    ax.set_title(title, fontsize=8)
    ax.axis("off")

fig, axes = plt.subplots(2, 5, figsize=(12, 5))
show(axes[0, 0], image[0].cpu(), "source image")
show(axes[1, 0], control[0].cpu(), f"input control ({CONDITION})")
for i in range(4):
    show(axes[0, i + 1], images[i].cpu(), f"generated {i}")
    show(axes[1, i + 1], reextracted[i], f"re-extracted {i}")
plt.tight_layout()
plt.show()""",
    ),
    (
        "code",
        """from innercontrol.controlled_unet import tap_decoder_features, tapped_channels
from innercontrol.probes import build_probe, load_probe
from innercontrol.readout import ProbeReadout

if PROBE is not None:
    probe = load_probe(PROBE)
    probe_note = PROBE
else:  # no trained probe yet: an untrained one shows the mechanics only (run `make demo` for a trained one)
    probe = build_probe(tapped_channels(pipe.unet, "conv"), 64, pipe.unet.config.block_out_channels[0] * 4, tap="conv")
    probe_note = "untrained probe"
probe = probe.to(DEVICE, DTYPE).eval()
with torch.no_grad(), tap_decoder_features(pipe.unet, probe.config.tap) as features:
    readout = ProbeReadout(probe, features, batch_size=1)
    pipe(PROMPT, image=control.to(DTYPE), num_inference_steps=STEPS, guidance_scale=7.5, height=RESOLUTION,
         width=RESOLUTION, generator=torch.Generator().manual_seed(SEED), output_type="latent",
         callback_on_step_end=readout)
shown = sorted(readout.predictions)[:: max(1, len(readout.predictions) // 4)]
fig, axes = plt.subplots(1, len(shown) + 1, figsize=(3 * (len(shown) + 1), 3))
show(axes[0], control[0].cpu(), "input control")
for ax, step in zip(axes[1:], shown):
    t, prediction = readout.predictions[step]
    show(ax, (prediction[0] + 1) / 2, f"probe at step {step} (t={t})")
fig.suptitle(f"what the probe reads from the decoder ({probe_note})")
plt.tight_layout()
plt.show()""",
    ),
]


def main() -> None:
    notebook = nbf.v4.new_notebook()
    notebook.cells = [
        nbf.v4.new_markdown_cell(src) if kind == "md" else nbf.v4.new_code_cell(src) for kind, src in CELLS
    ]
    notebook.metadata = {
        "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
        "language_info": {"name": "python"},
        "accelerator": "GPU",
    }
    path = Path(__file__).resolve().parents[1] / "inference.ipynb"
    nbf.write(notebook, path)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
