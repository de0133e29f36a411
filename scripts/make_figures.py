"""Regenerate images/: the method diagram (drawn with matplotlib) and the demo's example outputs.

make demo && python scripts/make_figures.py          # (make figures)
"""

import json
import shutil
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
IMAGES = ROOT / "images"


def box(ax, x, y, w, h, text, color):
    ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0.02", fc=color, ec="black", lw=1))
    ax.text(x + w / 2, y + h / 2, text, ha="center", va="center", fontsize=9)


def arrow(ax, start, end, text=None, style="-|>", color="black", bend=0.0):
    ax.add_patch(
        FancyArrowPatch(
            start, end, arrowstyle=style, mutation_scale=12, color=color, lw=1.2, connectionstyle=f"arc3,rad={bend}"
        )
    )
    if text:
        ax.text((start[0] + end[0]) / 2, (start[1] + end[1]) / 2 + 0.12, text, ha="center", fontsize=8, color=color)


def method_diagram(path: Path) -> None:
    fig, ax = plt.subplots(figsize=(11, 4.6))
    ax.set_xlim(0, 11)
    ax.set_ylim(0, 4.8)
    ax.axis("off")
    frozen, trained, loss = "#dfe7f2", "#f9d9a6", "#f4b6b6"
    box(ax, 0.2, 3.3, 1.6, 0.8, "control c\n(depth / edges)", "white")
    box(ax, 0.2, 1.5, 1.6, 0.8, "noisy latent x_t\n+ t, prompt", "white")
    box(ax, 2.4, 3.3, 1.8, 0.8, "ControlNet\n(trained)", trained)
    box(ax, 2.4, 1.2, 2.6, 1.4, "frozen SD1.5 UNet\nencoder | decoder", frozen)
    box(ax, 5.7, 2.7, 2.0, 0.9, "probe H(features, t)\n(frozen, pretrained)", frozen)
    box(ax, 5.7, 0.6, 2.0, 0.9, "x0 estimate -> VAE\n-> condition model", frozen)
    box(ax, 8.4, 2.7, 2.4, 0.9, "alignment loss\nt in [0, 920]", loss)
    box(ax, 8.4, 0.6, 2.4, 0.9, "reward loss\n(cycle consistency)\nt in [0, 200|400]", loss)
    box(ax, 5.7, 1.75, 2.0, 0.6, "diffusion MSE", loss)
    arrow(ax, (1.8, 3.7), (2.4, 3.7))
    arrow(ax, (1.8, 1.9), (2.4, 1.9))
    arrow(ax, (3.3, 3.3), (3.3, 2.6), "residuals")
    arrow(ax, (5.0, 2.2), (5.7, 3.0), "decoder\nfeatures")
    arrow(ax, (5.0, 1.5), (5.7, 1.05), "eps")
    arrow(ax, (5.0, 1.9), (5.7, 2.05))
    arrow(ax, (7.7, 3.15), (8.4, 3.15), "predicted c")
    arrow(ax, (7.7, 1.05), (8.4, 1.05), "c of x0")
    arrow(ax, (9.6, 3.6), (3.3, 4.1), style="-|>", color="#b03030", bend=0.25)
    ax.text(
        6.6,
        4.45,
        "alignment gradient reaches the ControlNet through its residuals",
        ha="center",
        fontsize=8,
        color="#b03030",
    )
    ax.text(
        0.2,
        0.15,
        "loss = diffusion_mse + w_r * reward[t in reward window] + w_a * alignment[t in alignment window]",
        fontsize=9,
        family="monospace",
    )
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)


def demo_copies(demo: Path) -> dict:
    """Demo outputs -> names in images/: the miniature's by default, the tiny random models' with --model tiny."""
    model = json.loads((demo / "demo.json").read_text())["model"] if (demo / "demo.json").is_file() else "tiny"
    copies = {
        demo / "probe" / "probe_accuracy.png": f"probe_accuracy_{model}.png",
        demo / "probe" / "probe_accuracy.md": f"probe_accuracy_{model}.md",
        demo / "eval" / "grid.png": f"example_grid_{model}.png",
        demo / "eval" / "probe_readout.png": f"probe_readout_{model}.png",
    }
    if model == "mini":
        copies[demo / "summary.md"] = "demo_summary_mini.md"
        copies[demo / "summary_grid.png"] = "demo_grid_mini.png"
        copies[demo / "eval" / "probe_readout.md"] = "probe_readout_mini.md"
    return copies


def main() -> None:
    IMAGES.mkdir(exist_ok=True)
    method_diagram(IMAGES / "method.png")
    for source, name in demo_copies(ROOT / "outputs" / "demo").items():
        if source.exists():
            shutil.copy(source, IMAGES / name)
        else:
            print(f"missing {source}: run `make demo` first")
    print(f"figures written to {IMAGES}")


if __name__ == "__main__":
    main()
