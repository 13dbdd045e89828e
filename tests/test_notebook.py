"""The Colab notebook runs headlessly on CPU (digits, tiny config) and is stored stripped."""

import json
import os
import pathlib

import nbformat
import pytest
from xla_flags import xla_flags

NOTEBOOK = pathlib.Path(__file__).resolve().parents[1] / "colab" / "defuse_jax.ipynb"


def _load():
    return nbformat.read(NOTEBOOK, as_version=4)


def test_notebook_is_stored_without_outputs():
    nb = _load()
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None
    assert "colab-badge.svg" in nb.cells[0].source


@pytest.mark.slow
def test_notebook_executes_on_digits(tmp_path):
    nbclient = pytest.importorskip("nbclient")
    nb = _load()
    params = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(params) == 1
    params[0].source = (
        'DATASET = "digits"\nTINY = True\nINSTALL = False\nREPO = ""\n'
        f"RUN_DIR = {str(tmp_path / 'run')!r}\n"
        # The relabeling cell runs too: reject the first error region, relabel the second "1".
    )
    first_two = '[r["id"] for r in report["regions"] if r["error_region"]][:2]'
    for cell in nb.cells:
        if cell.source.startswith("MY_LABELS = {}"):
            cell.source = cell.source.replace(
                "MY_LABELS = {}", f'MY_LABELS = dict(zip({first_two}, ["skip", "1"]))', 1
            )
    env = {**os.environ, "XLA_FLAGS": xla_flags(1)}
    client = nbclient.NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute(env=env)
    outputs = "\n".join(
        o.get("text", "") + str(o.get("data", {}).get("text/markdown", ""))
        for c in nb.cells if c.cell_type == "code" for o in c.outputs
    )  # fmt: skip
    assert "backend: cpu" in outputs
    assert "Test accuracy" in outputs  # the before/after table
    assert "samples/s" in outputs  # the benchmark cell ran
    assert (tmp_path / "run" / "report.json").exists()
    mine = json.loads((tmp_path / "run_mine" / "report.json").read_text())  # your own classifier
    assert mine["own_models"]["classifier"]["kind"] == "linen" and mine["num_samples_evaluated"]
    labels = (tmp_path / "run" / "label" / "labels.csv").read_text()
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    first = next(r["id"] for r in report["regions"] if r["error_region"])
    assert f"\n{first},skip," in labels
