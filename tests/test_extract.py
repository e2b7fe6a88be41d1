"""extract(): activation datasets on disk, locally (remote: test_extract_remote.py).

Every stored row is checked against a plain trace of the same text; padding is never stored;
a run killed with SIGKILL at a (seeded) random point and run again gives byte-identical files to
an uninterrupted run; the folder is readable with only safetensors + json; memory stays flat over
a 1M-token run (measured in a subprocess); bad arguments fail before anything runs.
"""

from __future__ import annotations

import json
import os
import random
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from tests.doc_blocks import run_python_blocks

from glassbox import CONFIG, LanguageModel, extract
from glassbox.offline import smollm2_path, tiny_gpt2_path, tiny_llama_path
from waiting import HANG

TEXTS = [
    "The Eiffel Tower is in Paris.",
    "Hi",
    "",  # no tokens: no rows, but still a document (numbering goes on)
    "The quick brown fox jumps over the lazy dog while the cat sleeps in the warm afternoon sun.",
    "Interpretability research reads activations.",
    "One two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen.",
]


@pytest.fixture(scope="module")
def gpt2() -> LanguageModel:
    return LanguageModel(tiny_gpt2_path())


@pytest.fixture(scope="module")
def llama() -> LanguageModel:
    return LanguageModel(tiny_llama_path())


def at(model: LanguageModel, path: str):
    module = model
    for part in path.split("."):
        module = module[part]
    return module


def plain(model: LanguageModel, text: str, paths: list[str]) -> dict[str, torch.Tensor]:
    """Each module's output for ``text`` alone: [positions, hidden]."""
    with torch.no_grad(), model.trace(text):
        saved = {path: at(model, path).output.save() for path in paths}
    return {path: value[0] for path, value in saved.items()}


def token_count(model: LanguageModel, text: str, max_length: int) -> int:
    return len(model.tokenizer(text, truncation=True, max_length=max_length)["input_ids"])


def check_rows(model, ds, texts, paths, max_length, reduce=None, tol=1e-5):
    """Every stored row equals the plain trace of its document (``reduce`` maps the plain trace's
    [positions, hidden] of one module and the document's stored positions to the expected rows)."""
    documents = ds.torch("document")[:]
    positions = ds.torch("position")[:]
    for document in sorted(set(documents.tolist())):
        rows = (documents == document).nonzero().flatten()
        expected = plain(model, texts[document], paths)
        for path in paths:
            got = ds.torch(path)[rows]
            if reduce is None:
                want = expected[path][positions[rows]]
            else:
                tokens = token_count(model, texts[document], max_length)
                want = reduce(expected[path][:tokens], positions[rows])
            torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol,
                                       msg=f"{document} {path}")


def test_every_row_equals_a_plain_trace_on_smollm2(tmp_path):
    model = LanguageModel(smollm2_path())
    paths = ["model.layers.3", "model.layers.10"]
    ds = extract(model, TEXTS, modules=[model.model.layers[10], model.model.layers[3]], out=tmp_path / "a",
                 batch_tokens=64, max_length=16)
    assert ds.names == paths  # the order the model runs them, whatever order they were given in
    check_rows(model, ds, TEXTS, paths, 16, tol=1e-4)  # batched vs alone: CPU kernels differ by shape
    # all positions: each document's rows are exactly its tokens 0..n-1 (truncated), in order
    documents, positions = ds.torch("document")[:].tolist(), ds.torch("position")[:].tolist()
    expected = [(d, p) for d, text in enumerate(TEXTS) for p in range(token_count(model, text, 16))]
    assert list(zip(documents, positions)) == expected
    assert len(ds.index["shards"]) > 1 and ds.complete


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_rows_equal_plain_traces_on_tiny_models_with_every_reduction(request, tmp_path, name):
    model = request.getfixturevalue(name)
    layers = model.transformer.h if name == "gpt2" else model.model.layers
    paths = [layers[1]._path, layers[3]._path]
    common = {"modules": [layers[1], layers[3]], "batch_tokens": 48, "max_length": 12}

    ds = extract(model, TEXTS, out=tmp_path / "all", **common)
    check_rows(model, ds, TEXTS, paths, 12)

    ds = extract(model, TEXTS, out=tmp_path / "last", positions="last", dtype="bfloat16", **common)
    assert ds.torch(paths[0]).dtype == torch.bfloat16
    check_rows(model, ds, TEXTS, paths, 12,
               reduce=lambda h, pos: h[[len(h) - 1]].to(torch.bfloat16), tol=0)
    assert ds.torch("position")[:].tolist() == [
        token_count(model, t, 12) - 1 for t in TEXTS if token_count(model, t, 12)]

    ds = extract(model, TEXTS, out=tmp_path / "slice", positions=slice(1, None, 2), **common)
    check_rows(model, ds, TEXTS, paths, 12)
    assert set(ds.torch("position")[:].tolist()) <= {1, 3, 5, 7, 9, 11}

    def even_tokens(ids):  # a callable: runs on the client, sees the document's token ids
        return [i for i, token in enumerate(ids) if token % 2 == 0]

    ds = extract(model, TEXTS, out=tmp_path / "callable", positions=even_tokens, **common)
    check_rows(model, ds, TEXTS, paths, 12)

    for pool in ("mean", "max"):
        ds = extract(model, TEXTS, out=tmp_path / pool, positions=slice(1, None), pool=pool, **common)
        assert set(ds.torch("position")[:].tolist()) == {-1}  # one row per document
        reducer = (lambda h, pos: h[1:].mean(0, keepdim=True)) if pool == "mean" else (
            lambda h, pos: h[1:].amax(0, keepdim=True))
        check_rows(model, ds, TEXTS, paths, 12, reduce=reducer)
        assert len(ds) == sum(token_count(model, t, 12) > 1 for t in TEXTS)

    torch.manual_seed(0)
    vectors = torch.randn(64, 6)
    ds = extract(model, TEXTS, out=tmp_path / "topk", project=vectors, topk=2, **common)
    assert ds.names == [paths[0], paths[0] + ":indices", paths[1], paths[1] + ":indices"]
    projected = {}
    for path in paths:

        def top(h, pos, path=path):
            projected[path] = (h[pos] @ vectors).topk(2, dim=-1)
            return projected[path].values

        check_rows(model, ds, TEXTS, [path], 12, reduce=top, tol=1e-5)
    # indices: those of the plain trace's top-k (checked on the last document, as check_rows ends there)
    rows = (ds.torch("document")[:] == len(TEXTS) - 1).nonzero().flatten()
    assert torch.equal(ds.torch(paths[1] + ":indices")[rows], projected[paths[1]].indices)


def hooked(model: LanguageModel, text: str, paths: list[str], max_length: int) -> dict[str, torch.Tensor]:
    """Each module's output for ``text`` alone, as a plain ``register_forward_hook`` on the torch
    module captures it (its first call; a tuple's first item): [positions, hidden]."""
    ids = model.tokenizer(text, truncation=True, max_length=max_length, return_tensors="pt")["input_ids"]
    got: dict[str, torch.Tensor] = {}

    def keep(path):
        def hook(module, args, output):
            got.setdefault(path, (output[0] if isinstance(output, tuple) else output)[0].clone())
        return hook

    handles = [model._model.get_submodule(path).register_forward_hook(keep(path)) for path in paths]
    try:
        with torch.no_grad():
            model._model(input_ids=ids)
    finally:
        for handle in handles:
            handle.remove()
    return got


def check_hooked(model, ds, texts, paths, max_length, tol):
    """Every stored row equals the hook capture of its document at its position."""
    documents, positions = ds.torch("document")[:], ds.torch("position")[:]
    for document in sorted(set(documents.tolist())):
        rows = (documents == document).nonzero().flatten()
        expected = hooked(model, texts[document], paths, max_length)
        for path in paths:
            torch.testing.assert_close(ds.torch(path)[rows], expected[path][positions[rows]], rtol=tol,
                                       atol=tol, msg=f"{document} {path}")


NESTED = {  # a block, two of its children and an earlier block, given parent first and out of order
    "gpt2": (["transformer.h.1", "transformer.h.1.mlp", "transformer.h.1.attn", "transformer.h.0"],
             ["transformer.h.0", "transformer.h.1.attn", "transformer.h.1.mlp", "transformer.h.1"]),
    "smollm2": (["model.layers.1", "model.layers.1.mlp", "model.layers.1.self_attn", "model.layers.0"],
                ["model.layers.0", "model.layers.1.self_attn", "model.layers.1.mlp", "model.layers.1"]),
}


@pytest.mark.parametrize("name", ["gpt2", "smollm2"])
def test_nested_modules_are_read_in_the_order_the_model_runs_them(request, tmp_path, name):
    """A block and its own submodules: each is read when its forward returns (children before the
    block that holds them), and every row equals a plain forward hook's capture."""
    model = request.getfixturevalue("gpt2") if name == "gpt2" else LanguageModel(smollm2_path())
    given, run = NESTED[name]
    ds = extract(model, TEXTS, modules=[at(model, path) for path in given], out=tmp_path / "n",
                 batch_tokens=48, max_length=12)
    assert ds.names == run and ds.index["settings"]["modules"] == run
    # batched (left-padded) vs alone: CPU kernels differ by shape, more so on the larger model
    check_hooked(model, ds, TEXTS, run, 12, tol=1e-5 if name == "gpt2" else 1e-4)
    assert len(ds.index["shards"]) > 1 and ds.complete


def test_a_forward_the_scan_cannot_run_is_ordered_by_the_module_tree(gpt2, tmp_path):
    """A forward that reads a number from its activations (as a router does) cannot run on fake
    tensors: the order falls back to the tree's post-order (children before their parent), which
    is this model's run order, and the rows still equal forward hooks' captures."""
    def route(module, args, output):
        float(output[0].detach().abs().max())  # data-dependent: a scan cannot know it

    handle = gpt2._model.transformer.h[0].register_forward_hook(route)
    try:
        given, run = NESTED["gpt2"]
        ds = extract(gpt2, TEXTS, modules=given, out=tmp_path / "f", batch_tokens=48, max_length=12)
        assert ds.names == run
        check_hooked(gpt2, ds, TEXTS, run, 12, tol=1e-5)
    finally:
        handle.remove()


def test_padding_is_never_stored(gpt2, tmp_path):
    """Documents of very different lengths share batches (left-padded); the rows are exactly the
    real tokens: as many rows as tokens, each position inside its document, no pad row."""
    texts = ["a " * n for n in (1, 30, 2, 17, 5, 30, 1)]
    ds = extract(gpt2, texts, modules=[gpt2.transformer.h[0]], out=tmp_path / "p", batch_tokens=64,
                 max_length=32)
    lengths = [token_count(gpt2, t, 32) for t in texts]
    assert len(ds) == sum(lengths) == ds.index["tokens"]
    assert max(s["documents"][1] - s["documents"][0] for s in ds.index["shards"]) > 1  # really padded
    for i in range(len(ds)):
        _, document, position = ds[i]
        assert 0 <= position < lengths[document]
    check_rows(gpt2, ds, texts, ["transformer.h.0"], 32)


def test_reading_rows_slices_and_columns(gpt2, tmp_path):
    ds = extract(gpt2, TEXTS, modules=["transformer.h.2"], out=tmp_path / "r", batch_tokens=16, max_length=8)
    column = ds.torch("transformer.h.2")
    assert len(ds.index["shards"]) > 2 and column.shape == (len(ds), 64)
    everything = column[:]
    picked = [len(ds) - 1, 0, 7, 3]  # across shards, out of order
    assert torch.equal(column[picked], everything[picked])
    assert torch.equal(column[-1], everything[-1])
    row = ds[5]
    assert torch.equal(row.activations["transformer.h.2"], everything[5])
    assert (row.document, row.position) == (int(ds.torch("document")[5]), int(ds.torch("position")[5]))
    window = ds[2:9]
    assert torch.equal(window.activations["transformer.h.2"], everything[2:9])
    assert ds.numpy("transformer.h.2")[4:6].tolist() == everything[4:6].tolist()
    bf16 = extract(gpt2, TEXTS, modules=["transformer.h.2"], out=tmp_path / "b", dtype="bfloat16")
    with pytest.raises(TypeError, match="bfloat16"):
        bf16.numpy("transformer.h.2")
    with pytest.raises(IndexError):
        ds[len(ds)]
    assert "complete" in repr(ds)


def test_sources_txt_and_jsonl_give_the_same_dataset_as_a_list(gpt2, tmp_path):
    texts = [t for t in TEXTS if t]  # a text file has no empty documents
    (tmp_path / "corpus.txt").write_text("\n".join(texts) + "\n\n")
    with open(tmp_path / "corpus.jsonl", "w") as handle:
        for i, text in enumerate(texts):
            handle.write(json.dumps({"body": text} if i % 2 else text) + "\n")
    runs = {}
    for name, source, field in (("list", texts, "text"), ("txt", tmp_path / "corpus.txt", "text"),
                                ("jsonl", str(tmp_path / "corpus.jsonl"), "body")):
        ds = extract(gpt2, source, modules=["transformer.h.1"], out=tmp_path / name, text_field=field,
                     batch_tokens=32, max_length=8)
        runs[name] = (ds.torch("transformer.h.1")[:], ds.torch("document")[:], ds.torch("position")[:])
    for name in ("txt", "jsonl"):
        for a, b in zip(runs["list"], runs[name]):
            assert torch.equal(a, b), name
    generator = extract(gpt2, (t for t in texts), modules=["transformer.h.1"], out=tmp_path / "gen",
                        batch_tokens=32, max_length=8)
    assert torch.equal(generator.torch("transformer.h.1")[:], runs["list"][0])


def test_progress_bar_shows_tokens_per_second(gpt2, tmp_path, capsys):
    extract(gpt2, TEXTS, modules=["transformer.h.1"], out=tmp_path / "p", progress=True, batch_tokens=32,
            max_length=8)
    shown = capsys.readouterr().err
    assert "tok/s" in shown and f"{len(TEXTS)}/{len(TEXTS)}" in shown


def test_bad_arguments_fail_before_anything_runs(gpt2, llama, tmp_path):
    out = tmp_path / "bad"
    cases = [
        (dict(modules=[]), TypeError, "non-empty list"),
        (dict(modules=[llama.model.layers[0]]), ValueError, "another model"),
        (dict(modules=["transformer.h.9"]), ValueError, "no submodule"),
        (dict(modules=["transformer.h.0", "transformer.h.0"]), ValueError, "twice"),
        (dict(modules=[gpt2]), ValueError, "whole model"),
        (dict(modules=[gpt2.transformer.h]), ValueError, r"transformer\.h never ran"),  # a container
        (dict(positions="first"), ValueError, "positions"),
        (dict(positions=[1.5]), ValueError, "ints"),
        (dict(pool="median"), ValueError, "pool"),
        (dict(topk=0), ValueError, "topk"),
        (dict(dtype="float77"), ValueError, "dtype"),
        (dict(max_length=100, batch_tokens=50), ValueError, "fit in a batch"),
        (dict(project=torch.randn(64)), ValueError, "2-D"),
        (dict(project={"transformer.h.3": torch.randn(64, 2)}), ValueError, "not one of"),
    ]
    for kwargs, error, words in cases:
        arguments = {"modules": ["transformer.h.0"], "out": out, **kwargs}
        with pytest.raises(error, match=words):
            extract(gpt2, TEXTS, **arguments)
        assert not out.exists()
    with pytest.raises(TypeError, match="list of str"):
        extract(gpt2, 42, modules=["transformer.h.0"], out=out)
    with pytest.raises(ValueError, match=r"\.txt"):
        extract(gpt2, str(tmp_path / "corpus.csv"), modules=["transformer.h.0"], out=out)
    with pytest.raises(ValueError, match="callable returned 99"):
        extract(gpt2, TEXTS, modules=["transformer.h.0"], out=tmp_path / "c", positions=lambda ids: [99])
    with pytest.raises(TypeError, match="document 1"):
        extract(gpt2, ["fine", 7], modules=["transformer.h.0"], out=tmp_path / "d")

    extract(gpt2, TEXTS, modules=["transformer.h.0"], out=out)
    with pytest.raises(ValueError, match=r"other settings.*positions"):
        extract(gpt2, TEXTS, modules=["transformer.h.0"], out=out, positions="last")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty"):
        extract(gpt2, TEXTS, modules=["transformer.h.0"], out=tmp_path / "busy")


# ---------------------------------------------------------------- files, kills, memory


def corpus(path: Path, documents: int, words: int, seed: int = 0) -> Path:
    """A .txt corpus of ``documents`` lines of ``words`` random words each."""
    rng = random.Random(seed)
    vocabulary = [w for w in (
        "the of and to in is was for on that with as by at from his her an which are this be had not "
        "river model layer token paris rome light stone water green quickly under over north south"
    ).split()]
    with open(path, "w") as handle:
        for _ in range(documents):
            handle.write(" ".join(rng.choice(vocabulary) for _ in range(words)) + "\n")
    return path


CHILD = """
import json, resource, sys
import psutil, torch
from glassbox import LanguageModel, extract
from glassbox.offline import tiny_gpt2_path
kwargs = json.loads(sys.argv[1])
model = LanguageModel(tiny_gpt2_path(*kwargs.pop("model", [])))
for source, out in kwargs.pop("runs"):
    extract(model, source, out=out, **kwargs)
    print(json.dumps({"rss": psutil.Process().memory_info().rss,
                      "peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}), flush=True)
"""


def child(runs: list, report: bool = False, **kwargs) -> subprocess.Popen:
    arguments = json.dumps({"runs": [[str(s), str(o)] for s, o in runs], **kwargs})
    return subprocess.Popen([sys.executable, "-c", CHILD, arguments], text=True,
                            stdout=subprocess.PIPE if report else subprocess.DEVNULL)


def folder_bytes(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


def shards_in(out: Path) -> int:
    try:
        return len(json.loads((out / "index.json").read_text())["shards"])
    except (FileNotFoundError, json.JSONDecodeError):
        return 0


def test_resume_after_kill_9_gives_the_files_of_an_uninterrupted_run(tmp_path):
    # 160 documents of at least 32 tokens (40 words), truncated to 32: 8 a batch, 20 shards
    source = corpus(tmp_path / "corpus.txt", documents=160, words=40)
    settings = {"modules": ["transformer.h.1", "transformer.h.3"], "batch_tokens": 256, "max_length": 32,
                "dtype": "bfloat16"}
    kill_after = random.Random(1234).randrange(3, 17)  # the (seeded) random point, in shards
    whole = child([(source, tmp_path / "whole")], **settings)  # uninterrupted, alongside
    killed = child([(source, tmp_path / "resumed")], **settings)
    while shards_in(tmp_path / "resumed") < kill_after and killed.poll() is None:
        time.sleep(0.005)
    os.kill(killed.pid, signal.SIGKILL)
    killed.wait()
    index = json.loads((tmp_path / "resumed" / "index.json").read_text())
    assert not index["complete"] and index["done"] < 160  # really interrupted

    resumed = child([(source, tmp_path / "resumed")], **settings)
    assert resumed.wait(timeout=HANG) == 0 and whole.wait(timeout=HANG) == 0
    assert shards_in(tmp_path / "whole") == 20
    assert folder_bytes(tmp_path / "resumed") == folder_bytes(tmp_path / "whole")


def test_resume_cleans_what_a_kill_between_shard_and_index_leaves(gpt2, tmp_path):
    """The two windows a kill can hit inside one shard: its temporary file is half written, or it
    is renamed but the index does not name it yet. Both are rebuilt exactly."""
    settings = {"modules": ["transformer.h.2"], "batch_tokens": 32, "max_length": 8}
    whole = extract(gpt2, TEXTS * 3, out=tmp_path / "whole", **settings)
    out = tmp_path / "cut"
    out.mkdir()
    for name, data in folder_bytes(tmp_path / "whole").items():
        (out / name).write_bytes(data)
    index = json.loads((out / "index.json").read_text())
    kept = index["shards"][:2]
    index.update(shards=kept, rows=kept[-1]["rows"][1], done=kept[-1]["documents"][1], complete=False,
                 tokens=sum(s["tokens"] for s in kept))
    (out / "index.json").write_text(json.dumps(index))          # shard 2.. renamed, not indexed
    (out / "shard-00003.safetensors.tmp").write_bytes(b"half")  # and one half written
    extract(gpt2, TEXTS * 3, out=out, **settings)
    assert folder_bytes(out) == folder_bytes(tmp_path / "whole") and whole.complete


def test_the_folder_reads_with_only_safetensors_and_json(gpt2, tmp_path):
    ds = extract(gpt2, TEXTS, modules=["transformer.h.1", "transformer.h.2"], out=tmp_path / "plain",
                 batch_tokens=32, max_length=8, dtype="float16")
    script = """
import json, sys
from safetensors.numpy import load_file
out = sys.argv[1]
index = json.load(open(out + "/index.json"))
rows, sums = 0, {}
for shard in index["shards"]:
    tensors = load_file(out + "/" + shard["file"])
    start, stop = shard["rows"]
    assert all(len(t) == stop - start for t in tensors.values())
    rows += stop - start
    for name, t in tensors.items():
        sums[name] = sums.get(name, 0.0) + float(t.astype("float64").sum())
assert "glassbox" not in sys.modules and "torch" not in sys.modules
print(json.dumps({"rows": rows, "total": index["rows"], "modules": index["settings"]["modules"],
                  "sums": sums}))
"""
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path / "plain")], capture_output=True,
                          text=True, timeout=HANG, check=True)
    seen = json.loads(done.stdout)
    assert seen["rows"] == seen["total"] == len(ds)
    assert seen["modules"] == ["transformer.h.1", "transformer.h.2"]
    for name, column in ds.numpy().items():
        assert seen["sums"][name] == pytest.approx(float(column[:].astype("float64").sum()), rel=1e-12)


def test_memory_stays_flat_from_10k_to_1m_tokens(tmp_path):
    """A subprocess extracts 1M tokens (8,000 documents of 128 tokens; all positions of the 32-wide
    layer of a 1-layer GPT-2, as float16: 64 MB of rows written) while this process samples its
    RSS and the tokens
    its index says are done. RSS while 10k-100k tokens were done, and again while 750k-1M were, and
    at the end: the later ones may exceed the early median by less than BOUND. Anything kept per
    token or per row (the rows: 64 MB; the token ids as Python ints: ~40 MB; per-shard records)
    would exceed it; the batch's own working memory (8,192 tokens) is in both windows alike.
    Medians, because one batch's transient allocations make single samples jump by ~50 MB."""
    bound = 24 * 2**20
    large = corpus(tmp_path / "large.txt", documents=8000, words=160, seed=2)
    run = child([(large, tmp_path / "large")], report=True, model=[1, 32, 2], modules=["transformer.h.0"],
                batch_tokens=8192, max_length=128, dtype="float16")
    watched, samples = psutil.Process(run.pid), []
    while run.poll() is None:
        try:
            tokens = json.loads((tmp_path / "large" / "index.json").read_text())["tokens"]
            samples.append((tokens, watched.memory_info().rss))
        except (FileNotFoundError, json.JSONDecodeError, psutil.NoSuchProcess):
            pass
        time.sleep(0.05)
    out, _ = run.communicate()
    assert run.returncode == 0
    final = json.loads(out)["rss"]
    tokens = json.loads((tmp_path / "large" / "index.json").read_text())["tokens"]
    assert tokens >= 1_000_000
    early = statistics.median(rss for t, rss in samples if 10_000 <= t <= 100_000)
    late = statistics.median(rss for t, rss in samples if t >= 750_000)
    print(f"RSS median at 10k-100k tokens {early / 2**20:.1f} MiB, at 750k-1M {late / 2**20:.1f} MiB, "
          f"at the end {final / 2**20:.1f} MiB ({len(samples)} samples)")
    assert late - early < bound and final - early < bound


def test_docs_examples_run(tmp_path, monkeypatch, capsys):
    """docs/extract.md's python blocks, in order, in one namespace (they write into the cwd)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(CONFIG, "STATUS", False)
    monkeypatch.setattr(CONFIG, "HOST", CONFIG.HOST)  # the remote example sets them: restored after
    monkeypatch.setattr(CONFIG, "API_KEY", CONFIG.API_KEY)
    run_python_blocks(Path(__file__).resolve().parent.parent / "docs" / "extract.md", least=5)
    captured = capsys.readouterr()
    assert "tok/s" in captured.err and "model.layers.10" in captured.out
