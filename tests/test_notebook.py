"""docs/tour.ipynb is the README tour plus plots, kept in sync, and it runs in a real Jupyter kernel.

The notebook is built from README.md (the tour: from "## A short tour" to the operators' section;
prose becomes markdown cells, each ```python block a code cell) followed by the "See it" cells
below, which draw figures with glassbox.plot. ``python tests/test_notebook.py`` rewrites
docs/tour.ipynb after the README or these cells change; the first test fails until it has been.

The second test executes the checked-in notebook with nbclient in an ipykernel started from this
interpreter (a kernelspec written to a temporary prefix), in a temporary working directory: the
tour's invoke blocks and its remote=True block against an embedded server included.
"""

from __future__ import annotations

import base64
import json
import re
import sys
from pathlib import Path

from waiting import HANG

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
NOTEBOOK = ROOT / "docs" / "tour.ipynb"
REGENERATE = ".venv/bin/python tests/test_notebook.py"
KERNEL = "glassbox-tour"

INTRO = f"""# glassbox: the tour, in a notebook

The README's tour, cell by cell, then figures drawn with `glassbox.plot` (see `docs/plots.md`).
Run it with the project's environment as the kernel (`pip install "glassbox[hf,server,plot]"`);
SmolLM2 is prepared offline on first use. `tests/test_notebook.py` runs this notebook in a real
kernel. It is generated from README.md (`{REGENERATE}`): edit the README, not this file."""

SEE_IT = [
    ("markdown", """## See it: figures from saved values

`glassbox.plot` draws what a trace saved (nothing runs the model again); each call returns a
matplotlib figure, which a notebook shows. `path=` (or `fig.savefig`) writes it to a file."""),
    ("code", """from glassbox import plot

prompt = "The Eiffel Tower is in"
ids = model_probs.tokenizer(prompt)["input_ids"]
tokens = plot.token_strings(ids, model_probs.tokenizer)
with model_probs.trace(prompt):
    hidden, patterns = [], []
    for layer in model_probs.model.layers:
        patterns.append(layer.self_attn.attn_probs.output.save())   # [1, heads, query, key]
        hidden.append(layer.output.save())                          # [1, positions, hidden]

with torch.no_grad():   # logit lens: the final norm and the unembedding on each layer's output
    lens = torch.stack([model_probs.lm_head(model_probs.model.norm(h[0])) for h in hidden])
print("last layer, last position:", repr(model_probs.tokenizer.decode(lens[-1, -1].argmax())))
plot.logit_lens(lens, tokens, model_probs.tokenizer)"""),
    ("markdown", """Activation patching, every (layer, position) cell of the sweep as one invoke of a
single batched forward: the clean run's hidden state patched into the corrupted prompt."""),
    ("code", """tokenizer = model_probs.tokenizer
paris, rome = tokenizer.encode(" Paris")[0], tokenizer.encode(" Rome")[0]
corrupted = "The Colosseum is in"
layers = [0, 8, 16, 24]
patched = {}
with model_probs.trace() as tracer:
    for layer in layers:
        for position in range(len(ids)):
            with tracer.invoke(corrupted):
                model_probs.model.layers[layer].output[:, position] = hidden[layer][:, position]
                patched[layer, position] = model_probs.output.logits[0, -1].save()
scores = torch.tensor([[(patched[layer, p][paris] - patched[layer, p][rome]).item() for p in range(len(ids))]
                       for layer in layers])
print(f"{len(patched)} patches in one forward; best logit difference {scores.max():.2f}")
plot.patching(scores, tokenizer(corrupted)["input_ids"], tokenizer=tokenizer,
              layers=layers, label="logit(Paris) - logit(Rome)")"""),
    ("code", """plot.attention(patterns[3], tokens)   # layer 3, mean over heads; head=5 for one head"""),
    ("code", """per_position = torch.stack([h[0].norm(dim=-1) for h in hidden])   # [layers, positions]
fig = plot.norms(per_position, series=tokens, log=True)
fig.savefig("norms.png")
fig"""),
]


def _tour(text: str) -> str:
    start = text.index("## A short tour")
    end = text.index("### Running a server", start)
    return text[start:end]


def build_notebook():
    """The notebook as it should be: the README tour, then SEE_IT."""
    import nbformat.v4 as v4

    cells = [("markdown", INTRO)]
    for piece in re.split(r"(```python\n.*?```)", _tour(README.read_text()), flags=re.S):
        if piece.startswith("```python\n"):
            cells.append(("code", piece[len("```python\n"):-3].rstrip("\n")))
        else:
            # the README's note on which test runs its examples belongs to the README
            prose = re.sub(r"Every example below is run by `tests/test_readme.py`[^\n]*\n", "", piece)
            prose = re.sub(r"\n{3,}", "\n\n", prose).strip()
            if prose:
                cells.append(("markdown", prose))
    cells += SEE_IT
    notebook = v4.new_notebook(metadata={
        "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
        "language_info": {"name": "python"},
    })
    for number, (kind, source) in enumerate(cells):
        make = v4.new_code_cell if kind == "code" else v4.new_markdown_cell
        notebook.cells.append(make(source, id=f"cell-{number:02d}"))  # stable ids: stable diffs
    return notebook


def _shape(notebook) -> list[tuple[str, str]]:
    return [(cell.cell_type, cell.source) for cell in notebook.cells]


def test_checked_in_notebook_matches_readme_tour():
    import nbformat

    checked_in = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(checked_in)
    assert _shape(checked_in) == _shape(build_notebook()), (
        f"docs/tour.ipynb is out of date with README.md's tour: run `{REGENERATE}`")
    code = "\n".join(cell.source for cell in checked_in.cells if cell.cell_type == "code")
    assert "tracer.invoke(" in code and "remote=True" in code and "start_server" in code


def _install_kernel(prefix: Path) -> Path:
    """A kernelspec for an ipykernel of this interpreter; returns the folder for JUPYTER_PATH."""
    from ipykernel.kernelspec import install

    folder = Path(install(kernel_name=KERNEL, prefix=str(prefix)))
    spec = json.loads((folder / "kernel.json").read_text())
    assert spec["argv"][0] == sys.executable  # the project's venv, whatever kernels the machine has
    return folder.parent.parent


def _outputs(cell) -> tuple[str, list[bytes]]:
    text, images = "", []
    for output in cell.get("outputs", []):
        if output.output_type == "stream":
            text += output.text
        elif output.output_type in ("execute_result", "display_data"):
            text += output.data.get("text/plain", "")
            if "image/png" in output.data:
                images.append(base64.b64decode(output.data["image/png"]))
    return text, images


def test_notebook_runs_in_a_real_kernel(tmp_path, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    monkeypatch.setenv("JUPYTER_PLATFORM_DIRS", "1")  # jupyter_core warns about its path migration otherwise
    monkeypatch.setenv("JUPYTER_PATH", str(_install_kernel(tmp_path / "kernel")))
    work = tmp_path / "work"
    work.mkdir()
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    # Limits for a hung cell or kernel start only (nbclient's default start limit is 60 s).
    client = NotebookClient(notebook, kernel_name=KERNEL, timeout=int(HANG), startup_timeout=int(HANG),
                            resources={"metadata": {"path": str(work)}})  # the kernel's working directory
    client.execute()  # a failing assert in any cell raises CellExecutionError here

    by_source = {cell.source: _outputs(cell) for cell in notebook.cells if cell.cell_type == "code"}
    printed = "".join(text for text, _ in by_source.values())
    assert "Sequential" in printed                               # print(net)
    assert "The capital of France is" in printed                 # the generation cell's decoded ids
    assert "printed on the server, shown here: (1, " in printed  # remote=True: the server's print
    assert "last layer, last position: ' Paris'" in printed      # the logit lens of saved layers
    assert re.search(r"24 patches in one forward; best logit difference \d", printed)
    pngs = [image for _, images in by_source.values() for image in images]
    assert len(pngs) == 4  # logit lens, patching, attention, norms: shown inline
    assert all(png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000 for png in pngs)
    assert (work / "norms.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # fig.savefig ran in work/


if __name__ == "__main__":
    import nbformat

    NOTEBOOK.parent.mkdir(exist_ok=True)
    nbformat.write(build_notebook(), NOTEBOOK)
    print(f"wrote {NOTEBOOK.relative_to(ROOT)}")
