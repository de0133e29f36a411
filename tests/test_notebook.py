"""inference.ipynb runs top to bottom offline on the CPU, in its mini (default) and tiny modes."""

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = 'MODE = "mini"'


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["mini", "tiny"])
def test_notebook_runs_offline(mode, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    notebook = nbformat.read(ROOT / "inference.ipynb", as_version=4)
    assert DEFAULT in notebook.cells[1].source  # the default a new user gets
    notebook.cells[1].source = notebook.cells[1].source.replace(DEFAULT, f'MODE = "{mode}"')
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    client = NotebookClient(notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}})
    client.execute()  # raises CellExecutionError on any failing cell
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    text = "".join(o.get("text", "") for o in outputs if o.get("name") == "stdout")
    assert text.startswith(f"{mode} "), text  # the mode's models were the ones loaded
    figures = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(figures) == 2  # inline figures: generations (with and without the ControlNet) and the probe readout
    if mode == "mini":  # depth RMSE per image, with and without the ControlNet, on the 0-255 scale
        rows = [line for line in text.splitlines() if line.startswith("depth RMSE vs the control")]
        assert len(rows) == 2
        for row in rows:
            values = [float(v) for v in row.split("[", 1)[1].rstrip("]").split(",")]
            assert len(values) == 4 and all(0 <= v <= 255 for v in values)
