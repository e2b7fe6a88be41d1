"""glassbox.plot draws real SmolLM2 values a trace saved, and docs/plots.md's examples run.

Each figure is written as a PNG and read back; its axes must carry the tokenizer's token strings
and the documented labels, and its image must hold the values it was given.
"""

from __future__ import annotations

import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tests.doc_blocks import run_python_blocks

from glassbox import LanguageModel, plot
from glassbox.offline import smollm2_path
from waiting import HANG

DOCS = Path(__file__).resolve().parent.parent / "docs" / "plots.md"
CLEAN, CORRUPTED = "The Eiffel Tower is in", "The Colosseum is in"
ATTENTION_LAYER = 3


@pytest.fixture(scope="module")
def model() -> LanguageModel:
    return LanguageModel(smollm2_path(), attn_implementation="glassbox")


@pytest.fixture(scope="module")
def saved(model: LanguageModel) -> dict:
    """One clean trace: every layer's output, one layer's attention probabilities, the logits."""
    with model.trace(CLEAN):
        hidden = []
        for index, layer in enumerate(model.model.layers):
            if index == ATTENTION_LAYER:
                pattern = layer.self_attn.attn_probs.output.save()
            hidden.append(layer.output.save())
        logits = model.output.logits.save()
    ids = model.tokenizer(CLEAN)["input_ids"]
    tokens = [model.tokenizer.decode([i]) for i in ids]
    return {"hidden": hidden, "pattern": pattern, "logits": logits, "ids": ids, "tokens": tokens}


def _assert_png(path: Path) -> None:
    import matplotlib.image

    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    assert width > 100 and height > 100
    pixels = matplotlib.image.imread(path)  # decodes the whole file
    assert pixels.shape[:2] == (height, width)
    assert pixels.std() > 0.01  # not a blank canvas


def _labels(ticks) -> list[str]:
    return [tick.get_text() for tick in ticks]


def test_logit_lens_of_saved_layers(model, saved, tmp_path):
    with torch.no_grad():
        lens = torch.stack([model.lm_head(model.model.norm(h[0])) for h in saved["hidden"]])
    path = tmp_path / "lens.png"
    fig = plot.logit_lens(lens, saved["ids"], model.tokenizer, path=path)
    _assert_png(path)
    ax = fig.axes[0]
    assert _labels(ax.get_xticklabels()) == saved["tokens"]
    assert _labels(ax.get_yticklabels()) == [str(i) for i in range(len(saved["hidden"]))]
    assert ax.get_ylabel() == "layer" and "position" in ax.get_xlabel()
    assert fig.axes[1].get_ylabel() == "probability of the top token"
    # the last layer's lens at the last position is the model's own prediction
    probs = torch.softmax(saved["logits"][0].float(), -1)
    cell = {(round(t.get_position()[0]), round(t.get_position()[1])): t.get_text() for t in ax.texts}
    last = (len(saved["ids"]) - 1, len(saved["hidden"]) - 1)
    assert cell[last] == model.tokenizer.decode([probs[-1].argmax().item()]) == " Paris"
    colours = torch.as_tensor(ax.images[0].get_array())
    assert torch.allclose(colours[-1], probs.max(-1).values, atol=1e-4)
    # probabilities, or a list with the batch dimension kept, draw the same figure
    same = plot.logit_lens([torch.softmax(row, -1)[None] for row in lens], saved["tokens"], model.tokenizer)
    assert [t.get_text() for t in same.axes[0].texts] == [t.get_text() for t in ax.texts]


def test_patching_sweep_heatmap(model, saved, tmp_path):
    layers = [0, 12, 24]
    paris, rome = model.tokenizer.encode(" Paris")[0], model.tokenizer.encode(" Rome")[0]
    positions = range(len(saved["ids"]))
    logits = {}
    with model.trace() as tracer:
        for layer in layers:
            for position in positions:
                with tracer.invoke(CORRUPTED):
                    model.model.layers[layer].output[:, position] = saved["hidden"][layer][:, position]
                    logits[layer, position] = model.output.logits[0, -1].save()
    scores = torch.tensor([[(logits[lay, p][paris] - logits[lay, p][rome]).item() for p in positions]
                           for lay in layers])
    corrupted_ids = model.tokenizer(CORRUPTED)["input_ids"]
    path = tmp_path / "patching.png"
    fig = plot.patching(scores, corrupted_ids, layers=layers, tokenizer=model.tokenizer,
                        label="logit diff", path=path)
    _assert_png(path)
    ax = fig.axes[0]
    assert _labels(ax.get_xticklabels()) == [model.tokenizer.decode([i]) for i in corrupted_ids]
    assert _labels(ax.get_yticklabels()) == ["0", "12", "24"]
    assert fig.axes[1].get_ylabel() == "logit diff" and "logit diff" in ax.get_title()
    assert torch.allclose(torch.as_tensor(ax.images[0].get_array()), scores)
    assert len(ax.texts) == scores.numel()  # a 3 x 6 grid is annotated
    # patching the last position late restores the clean answer; patching the first token does nothing
    assert scores[-1, -1] > 0 > scores[0, 0]


def test_attention_pattern_mean_and_one_head(saved, tmp_path):
    pattern = saved["pattern"]  # [1, heads, query, key]
    heads = pattern.shape[1]
    path = tmp_path / "attention.png"
    fig = plot.attention(pattern, saved["tokens"], path=path)
    _assert_png(path)
    ax = fig.axes[0]
    assert _labels(ax.get_xticklabels()) == saved["tokens"] == _labels(ax.get_yticklabels())
    assert ax.get_xlabel().startswith("key") and ax.get_ylabel().startswith("query")
    assert f"mean of {heads} heads" in ax.get_title()
    assert torch.allclose(torch.as_tensor(ax.images[0].get_array()), pattern[0].mean(0))
    one = plot.attention(pattern[0], saved["tokens"], head=2, path=tmp_path / "head2.png")
    _assert_png(tmp_path / "head2.png")
    assert "head 2" in one.axes[0].get_title()
    assert torch.equal(torch.as_tensor(one.axes[0].images[0].get_array()), pattern[0, 2])
    # queries fewer than keys (a generation step): the queries are the last tokens
    tail = plot.attention(pattern[0, :, -2:], saved["tokens"])
    assert _labels(tail.axes[0].get_yticklabels()) == saved["tokens"][-2:]


def test_norms_per_layer_per_position(model, saved, tmp_path):
    table = torch.stack([h[0].norm(dim=-1) for h in saved["hidden"]])  # [layers, positions]
    path = tmp_path / "norms.png"
    fig = plot.norms(table, series=saved["ids"], tokenizer=model.tokenizer, log=True, path=path)
    _assert_png(path)
    ax = fig.axes[0]
    assert _labels(ax.get_legend().get_texts()) == saved["tokens"]
    assert len(ax.lines) == len(saved["tokens"]) and ax.get_yscale() == "log"
    assert ax.get_xlabel() == "layer" and ax.get_ylabel() == "norm"
    assert torch.allclose(torch.as_tensor(ax.lines[-1].get_ydata()), table[:, -1])
    bars = plot.norms(table[:, -1], kind="bar", path=tmp_path / "bars.png")
    _assert_png(tmp_path / "bars.png")
    assert len(bars.axes[0].patches) == table.shape[0] and bars.axes[0].get_legend() is None


def test_bad_input_is_named(model, saved):
    tokens, pattern = saved["tokens"], saved["pattern"]
    with pytest.raises(ValueError, match=r"5 tokens given for 6 keys"):
        plot.attention(pattern, tokens[:-1])
    with pytest.raises(ValueError, match=r"expected shape \[layers, positions, vocab\].*got \[6, 576\]"):
        plot.logit_lens(saved["hidden"][0][0], tokens, model.tokenizer)
    with pytest.raises(ValueError, match=r"expected shape \[layers, positions\], got \[2, 3, 4\]"):
        plot.patching(torch.zeros(2, 3, 4), tokens)
    with pytest.raises(ValueError, match=r"7 tokens given for 6 positions"):
        plot.patching(torch.zeros(2, 6), [*tokens, "x"])
    with pytest.raises(ValueError, match=r"head=9 is out of range: the pattern has 9 heads"):
        plot.attention(pattern, tokens, head=9)
    with pytest.raises(ValueError, match=r"\[layers\] or \[layers, series\], got \[1, 6, 576\]"):
        plot.norms(saved["hidden"][0], series=None)
    with pytest.raises(ValueError, match=r"3 layer labels given for 2 layers"):
        plot.patching(torch.zeros(2, 6), tokens, layers=[0, 1, 2])
    with pytest.raises(TypeError, match=r"need a tokenizer"):
        plot.patching(torch.zeros(2, 6), saved["ids"])


def test_docs_examples_run(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the examples write their PNGs to the working directory
    run_python_blocks(DOCS, least=5)
    for name in ("logit_lens", "patching", "attention", "attention_head5", "norms", "norms_last"):
        _assert_png(tmp_path / f"{name}.png")
    printed = capsys.readouterr().out
    assert "5 tokens given for 6 keys" in printed and "got [6]" in printed


def test_import_glassbox_needs_no_matplotlib_and_says_how_to_get_it():
    # A fresh interpreter where importing matplotlib fails (None in sys.modules is Python's own
    # "not importable"), as on an install without the [plot] extra.
    code = (
        "import sys; sys.modules['matplotlib'] = None\n"
        "import glassbox\n"
        "assert glassbox.plot.norms\n"
        "try:\n"
        "    glassbox.plot.norms([1.0, 2.0])\n"
        "except ImportError as err:\n"
        "    print(err)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=HANG)
    assert done.returncode == 0, done.stderr
    assert 'pip install "glassbox[plot]"' in done.stdout
