"""A real server from a model catalog: placement options, on-demand loading and eviction.

One server (``glassbox serve --models-file``, process isolation as in production) serves:
    split    SmolLM2 float32 with device_map="auto" and a small max_memory: accelerate puts part
             of it on the CPU and the rest on disk (offload_folder); eager and pinned
    smollm2  SmolLM2 in bfloat16, loaded on demand
    tiny     a tiny Llama, eager and unpinned
under a memory_budget that holds split + smollm2 but not all three, so serving smollm2 evicts
tiny, and serving tiny again evicts smollm2.
"""

from __future__ import annotations

import io
import textwrap
from contextlib import redirect_stderr

import httpx
import pytest
import torch

from glassbox import CONFIG, LanguageModel
from glassbox.cli import start_server
from glassbox.server.sizing import estimate, worker_bytes
from waiting import REQUEST

PROMPT = "The Eiffel Tower is in"


@pytest.fixture(scope="module")
def paths() -> dict[str, str]:
    from glassbox.offline import smollm2_path, tiny_llama_path

    return {"smollm2": str(smollm2_path()), "tiny": str(tiny_llama_path())}


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("catalog")


@pytest.fixture(scope="module")
def weights(root):
    """The catalog's share_weights folder: models loaded on demand are sealed into files there by
    the confined zygote, and an evicted model's file goes with it."""
    return root / "weights"


@pytest.fixture(scope="module")
def server(root, weights, paths):
    sizes = {name: estimate(name, path, options) for name, path, options in (
        ("split", paths["smollm2"], {}), ("smollm2", paths["smollm2"], {"dtype": "bfloat16"}),
        ("tiny", paths["tiny"], {}))}
    # a worker at peak with split + smollm2, and half of tiny: two fit, not all three
    budget = worker_bytes([sizes["split"], sizes["smollm2"]]) + sizes["tiny"].held_bytes // 2
    catalog = root / "catalog.toml"
    catalog.write_text(textwrap.dedent(f"""
        [server]
        memory_budget = {budget}
        torch_threads = 1
        share_weights = "{weights}"

        [models.split]
        path = "{paths['smollm2']}"
        device_map = "auto"
        max_memory = {{ cpu = "200MiB" }}
        offload_folder = "offload"
        pinned = true

        [models.smollm2]
        path = "{paths['smollm2']}"
        dtype = "bfloat16"
        load = "on_demand"

        [models.tiny]
        path = "{paths['tiny']}"
    """))
    running = start_server({}, state_dir=str(root / "state"), args=["--models-file", str(catalog)])
    old = CONFIG.HOST, CONFIG.API_KEY
    CONFIG.HOST, CONFIG.API_KEY = running.url, running.create_key("catalog")
    try:
        yield running
    finally:
        CONFIG.HOST, CONFIG.API_KEY = old
        running.stop()


def models(server) -> dict[str, dict]:
    """/v1/models as a key holder sees it (state and last use follow jobs: not shown without a key)."""
    return {m["name"]: m for m in httpx.get(server.url + "/v1/models", headers={"X-API-Key": CONFIG.API_KEY},
                                            timeout=REQUEST).json()["models"]}


def trace(model: LanguageModel, **kwargs) -> dict[str, torch.Tensor]:
    with model.trace(PROMPT, **kwargs):
        model.model.layers[2].output[0][:, -1] *= 0.5
        hidden = model.model.layers[3].output[0].save()
        logits = model.lm_head.output.save()
    return {"hidden": hidden, "logits": logits}


def test_v1_models_lists_each_models_state_size_and_last_use(server, paths):
    listed = models(server)
    assert {name: info["state"] for name, info in listed.items()} == {
        "split": "ready", "smollm2": "cold", "tiny": "ready"}
    size = estimate("smollm2", paths["smollm2"], {"dtype": "bfloat16"})
    assert listed["smollm2"]["bytes"] == size.loaded_bytes
    assert listed["split"]["pinned"] is True and listed["smollm2"]["load"] == "on_demand"
    assert all(info["replicas"] == 1 for info in listed.values())
    assert listed["smollm2"]["last_used"] is None
    listing = httpx.get(server.url + "/v1/models", timeout=REQUEST).text
    assert paths["smollm2"] not in listing  # no server paths


def test_a_model_split_over_cpu_and_disk_equals_it_unsplit_locally_and_remotely(server, paths, tmp_path):
    whole = LanguageModel(paths["smollm2"], dispatch=True)
    split = LanguageModel(paths["smollm2"], dispatch=True, device_map="auto",
                          max_memory={"cpu": 200 * 2**20}, offload_folder=str(tmp_path / "offload"))
    assert {"cpu", "disk"} <= set(split._module.hf_device_map.values())  # really split
    expected = trace(whole)
    # Within float rounding, not bit for bit: accelerate hands each forward freshly loaded copies
    # of the offloaded weights, at other addresses, and CPU kernels pick code paths by alignment.
    for got in (trace(split), trace(LanguageModel("split"), remote=True)):
        for name in expected:
            torch.testing.assert_close(got[name], expected[name].detach(), rtol=1e-4, atol=1e-4)
    # the edit really happened (accelerate's hooks and glassbox's wrappers coexist), and left
    # nothing behind: a trace without it gives the plain forward again
    plain = whole._module(**whole.tokenizer(PROMPT, return_tensors="pt")).logits
    assert not torch.allclose(expected["logits"], plain)
    with split.trace(PROMPT):
        again = split.lm_head.output.save()
    torch.testing.assert_close(again, plain.detach(), rtol=1e-4, atol=1e-4)


def test_a_cold_model_loads_on_demand_evicting_the_least_recently_used(server, paths, weights):
    local = LanguageModel(paths["smollm2"], dtype=torch.bfloat16, dispatch=True)
    remote = LanguageModel("smollm2")
    before = set(weights.glob("glassbox-*.weights"))
    assert len(before) == 2  # split's part on the CPU, and tiny
    shown = io.StringIO()
    with redirect_stderr(shown):
        got = trace(remote, remote=True)
    assert "RUNNING (loading smollm2 (evicting tiny))" in shown.getvalue()
    after = set(weights.glob("glassbox-*.weights"))
    assert len(after) == 2 and len(before & after) == 1  # tiny's file went with it, smollm2's came
    expected = trace(local)
    assert got["hidden"].dtype == torch.bfloat16
    for name in expected:
        assert torch.equal(got[name], expected[name]), name  # bf16 remote == bf16 local, bit for bit
    listed = models(server)
    assert (listed["smollm2"]["state"], listed["tiny"]["state"], listed["split"]["state"]) == (
        "ready", "cold", "ready")
    assert listed["smollm2"]["last_used"] is not None
    assert "evicted tiny" in server.output()


def test_jobs_for_models_that_evict_each_other_all_complete(server, paths):
    """Interleaved jobs for two models that do not fit together: each load evicts the other, and
    no job fails for it."""
    expected = {name: trace(LanguageModel(paths[name], dispatch=True,
                                          **({"dtype": torch.bfloat16} if name == "smollm2" else {})))
                for name in ("tiny", "smollm2")}
    handles = []
    for name in ("tiny", "smollm2", "tiny", "smollm2"):
        model = LanguageModel(name)
        with model.trace(PROMPT, remote=True, blocking=False) as tracer:
            model.model.layers[2].output[0][:, -1] *= 0.5
            logits = model.lm_head.output.save()  # noqa: F841  (comes back in the job's result)
        handles.append((name, tracer.job))
    for name, job in handles:
        # (the server runs 1 torch thread, this process more: sums may round differently)
        torch.testing.assert_close(job.result()["logits"], expected[name]["logits"].detach(),
                                   rtol=1e-5, atol=1e-5, msg=name)
    assert models(server)["split"]["state"] == "ready"  # pinned: never evicted
    log = server.output()
    assert log.count("evicting") >= 3 and "evicted split" not in log


def test_a_model_over_the_budget_fails_at_start_naming_it(tmp_path, paths):
    catalog = tmp_path / "catalog.toml"
    catalog.write_text(f'[server]\nmemory_budget = "10MiB"\n[models.smollm2]\npath = "{paths["smollm2"]}"\n')
    with pytest.raises(RuntimeError) as caught:
        start_server({}, state_dir=str(tmp_path / "state"), args=["--models-file", str(catalog)])
    message = str(caught.value)
    assert "do not fit this server's memory_budget" in message
    assert "the eager models (smollm2) need" in message and "0.01 GiB" in message


def test_a_catalog_of_only_on_demand_models_serves_under_the_default_isolation(tmp_path, paths):
    """Every model loads after the worker is confined, one of them offloaded to disk: the worker
    prepared what loading needs before confining itself, writes the offload folder itself, and
    the values equal a local run."""
    from glassbox.offline import tiny_gpt2_path

    offload = tmp_path / "offload"
    catalog = tmp_path / "catalog.toml"
    catalog.write_text(textwrap.dedent(f"""
        [models.tiny]
        path = "{paths['tiny']}"
        load = "on_demand"
        device_map = "auto"
        max_memory = {{ cpu = "8MiB" }}
        offload_folder = "{offload}"

        [models.gpt2]
        path = "{tiny_gpt2_path()}"
        load = "on_demand"
    """))
    running = start_server({}, state_dir=str(tmp_path / "state"), args=["--models-file", str(catalog)])
    old = CONFIG.HOST, CONFIG.API_KEY
    try:
        CONFIG.HOST, CONFIG.API_KEY = running.url, running.create_key("on-demand")
        states = {name: info["state"] for name, info in models(running).items()}
        assert states == {"tiny": "cold", "gpt2": "cold"}
        with redirect_stderr(io.StringIO()):
            tiny, gpt2 = LanguageModel("tiny"), LanguageModel("gpt2")
            remote = trace(tiny, remote=True)
            with gpt2.trace(PROMPT, remote=True):
                gpt2_logits = gpt2.lm_head.output.save()
        local = trace(LanguageModel(paths["tiny"], dispatch=True))
        for name in local:
            assert torch.allclose(remote[name], local[name], atol=1e-6), name
        local_gpt2 = LanguageModel(str(tiny_gpt2_path()), dispatch=True)
        with local_gpt2.trace(PROMPT):
            expected = local_gpt2.lm_head.output.save()
        assert torch.equal(gpt2_logits, expected)
        assert any(path.suffix == ".dat" for path in offload.iterdir())  # really offloaded to disk
        assert {name: info["state"] for name, info in models(running).items()} == {"tiny": "ready",
                                                                                  "gpt2": "ready"}
    finally:
        CONFIG.HOST, CONFIG.API_KEY = old
        running.stop()
