"""The model catalog and `glassbox plan`: what an operator writes, checked before any weight is read.

Every error names the file, the model, the option and the value; the plan's numbers are those of
the real model (parameters counted on the loaded weights, bytes at the served dtype).
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

from glassbox.server.catalog import CatalogError, parse_size, read_catalog
from glassbox.server.config import ServerConfig
from glassbox.server.sizing import GPU_RESERVE_BYTES, MODEL_OVERHEAD_BYTES, PROCESS_BYTES, estimate
from waiting import HANG


@pytest.fixture(scope="module")
def smollm2() -> str:
    from glassbox.offline import smollm2_path

    return str(smollm2_path())


@pytest.fixture(scope="module")
def tiny() -> str:
    from glassbox.offline import tiny_llama_path

    return str(tiny_llama_path())


def write(tmp_path, text: str) -> str:
    path = tmp_path / "catalog.toml"
    path.write_text(textwrap.dedent(text))
    return str(path)


def test_a_catalog_becomes_the_server_config(tmp_path, smollm2, tiny):
    path = write(tmp_path, f"""
        [server]
        memory_budget = "2GiB"
        max_seconds = 30

        [models.smollm2]
        path = "{smollm2}"
        dtype = "bfloat16"
        device_map = "auto"
        max_memory = {{ cpu = "1GiB" }}
        load = "on_demand"

        [models.tiny]
        path = "{tiny}"
        pinned = true
    """)
    config = ServerConfig.from_catalog(path, max_seconds=10.0)
    assert config.models == {"smollm2": smollm2, "tiny": tiny}
    assert config.memory_budget == 2 * 1024**3
    assert config.max_seconds == 10.0  # the command line wins over [server]
    assert config.load_options("smollm2") == {"dtype": "bfloat16", "device_map": "auto",
                                              "max_memory": {"cpu": 1024**3}}
    assert config.load_mode("smollm2") == "on_demand" and config.load_mode("tiny") == "eager"
    assert config.pinned("tiny") and not config.pinned("smollm2")
    assert config.worker_specs(["tiny"]) == {"tiny": {"path": tiny, "options": {}}}


def test_relative_paths_are_taken_from_the_catalogs_folder(tmp_path):
    (tmp_path / "models" / "m").mkdir(parents=True)
    catalog = read_catalog(write(tmp_path, """
        [models.m]
        path = "./models/m"
        offload_folder = "offload"
    """))
    assert catalog.models["m"].path == str(tmp_path / "models" / "m")
    assert catalog.models["m"].options["offload_folder"] == str(tmp_path / "offload")


@pytest.mark.parametrize(("body", "words"), [
    ('dtpye = "bfloat16"', ["model 'm'", "'dtpye'", "dtype"]),
    ('dtype = "bf16"', ["model 'm'", "dtype = 'bf16'", "bfloat16"]),
    ('device_map = "gpu"', ["model 'm'", "device_map = 'gpu'", "auto"]),
    ('max_memory = { cpu = "lots" }', ["model 'm'", "max_memory['cpu']", "'lots' is not a size"]),
    ('max_memory = { gpu0 = "1GiB" }', ["model 'm'", "'gpu0'", "not a device"]),
    ('load = "lazy"', ["model 'm'", "load = 'lazy'", "on_demand"]),
    ("replicas = 0", ["model 'm'", "replicas = 0"]),
    ("resources = { tpus = 1 }", ["model 'm'", "resources.tpus"]),
    ('engine = "tgi"', ["model 'm'", "engine = 'tgi'", "vllm"]),
    ('engine = "vllm"\ndevice_map = "auto"', ["model 'm'", "'device_map'", "glassbox.VLLM"]),
    ('engine = "vllm"\nload = "on_demand"', ["model 'm'", "engine 'vllm'", "eager"]),
])
def test_a_wrong_option_names_the_model_the_option_and_the_value(tmp_path, tiny, body, words):
    path = write(tmp_path, f'[models.m]\npath = "{tiny}"\n{body}\n')
    with pytest.raises(CatalogError) as caught:
        read_catalog(path)
    for word in [str(path), *words]:
        assert word in str(caught.value)


def test_a_replica_asks_ray_for_the_gpus_its_placement_names(tmp_path, tiny):
    path = write(tmp_path, f"""
        [models.two]
        path = "{tiny}"
        max_memory = {{ "0" = "75GiB", "1" = "75GiB", cpu = "100GiB" }}
        [models.one]
        path = "{tiny}"
        device_map = "cuda:0"
        [models.cpu]
        path = "{tiny}"
        [models.told]
        path = "{tiny}"
        device_map = "cuda:0"
        resources = {{ gpus = 0.5, cpus = 2 }}
    """)
    catalog = read_catalog(path)
    assert catalog.models["two"].resources == {"num_gpus": 2.0}
    assert catalog.models["one"].resources == {"num_gpus": 1.0}
    assert catalog.models["cpu"].resources == {}
    assert catalog.models["told"].resources == {"num_gpus": 0.5, "num_cpus": 2.0}


def test_whole_file_errors(tmp_path, tiny):
    with pytest.raises(CatalogError, match="not valid TOML"):
        read_catalog(write(tmp_path, "[models.m\n"))
    with pytest.raises(CatalogError, match="no models"):
        read_catalog(write(tmp_path, "[server]\nmax_seconds = 3\n"))
    with pytest.raises(CatalogError, match="cannot read the model catalog"):
        read_catalog(tmp_path / "missing.toml")
    with pytest.raises(CatalogError, match=r"\[server\] 'max_secs' is not a server setting"):
        ServerConfig.from_catalog(write(tmp_path, f'[server]\nmax_secs = 3\n[models.m]\npath = "{tiny}"\n'))


def test_settings_that_cannot_work_together_fail_at_start(tmp_path, tiny):
    on_demand = write(tmp_path, f'[models.m]\npath = "{tiny}"\nload = "on_demand"\noffload_folder = "off"\n')
    # Offload + on demand works under the default isolation (test_on_demand.py serves it); on Ray a
    # replica loads its model at start, so on-demand loading is refused there, naming the fix.
    assert ServerConfig.from_catalog(on_demand).load_mode("m") == "on_demand"
    for isolation in ("none", "process"):
        with pytest.raises(ValueError, match="needs --backend local"):
            ServerConfig.from_catalog(on_demand, backend="ray", isolation=isolation)


def test_sizes_as_operators_write_them():
    assert parse_size("16GiB") == 16 * 1024**3
    assert parse_size("80 GB") == 80 * 1000**3
    assert parse_size("1.5MiB") == int(1.5 * 1024**2)
    assert parse_size(4096) == 4096
    for bad in ("16 gigs", "", "-1GiB", True):
        with pytest.raises(CatalogError, match="size"):
            parse_size(bad)


def test_the_estimate_counts_the_real_models_parameters_at_its_served_dtype(smollm2):
    from transformers import AutoModelForCausalLM

    real = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.bfloat16)
    tensors = {id(t): t for t in [*real.parameters(), *real.buffers()]}  # tied weights once
    size = estimate("smollm2", smollm2, {"dtype": "bfloat16"})
    assert size.parameters == sum(p.numel() for p in {id(p): p for p in real.parameters()}.values())
    assert size.weight_bytes == sum(t.numel() * t.element_size() for t in tensors.values())
    assert size.loaded_bytes == PROCESS_BYTES + size.weight_bytes + MODEL_OVERHEAD_BYTES
    assert estimate("smollm2", smollm2).weight_bytes == 2 * size.weight_bytes - _buffer_bytes(real)
    one_gpu = size.device_bytes + GPU_RESERVE_BYTES
    assert size.devices(one_gpu) == 1 and size.devices(one_gpu - 1) == 2


def _buffer_bytes(module: torch.nn.Module) -> int:
    # buffers (rotary frequencies) stay float32 whatever the weights' dtype
    return sum(b.numel() * b.element_size() for b in module.buffers())


def plan(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "glassbox.cli", "plan", *args], capture_output=True,
                          text=True, timeout=HANG)


def test_glassbox_plan_prints_each_model_and_whether_the_catalog_fits(tmp_path, smollm2, tiny):
    size = estimate("smollm2", smollm2, {"dtype": "bfloat16"})
    fits = write(tmp_path, f"""
        [server]
        memory_budget = "1GiB"
        [models.smollm2]
        path = "{smollm2}"
        dtype = "bfloat16"
        load = "on_demand"
        [models.tiny]
        path = "{tiny}"
    """)
    done = plan(fits, "--gpu-memory", "80GiB")
    assert done.returncode == 0, done.stderr
    row = next(line for line in done.stdout.splitlines() if line.startswith("smollm2"))
    gib = [f"{n / 1024**3:.2f}" for n in (size.weight_bytes, size.loaded_bytes, size.peak_bytes)]
    assert row.split()[:11] == ["smollm2", f"{size.parameters / 1e6:.1f}", "M", "bfloat16",
                                gib[0], "GiB", gib[1], "GiB", gib[2], "GiB", "on_demand"]
    assert row.split()[-1] == "1"  # GPUs per replica
    assert done.stdout.rstrip().endswith("fits")

    too_small = write(tmp_path, f"""
        [server]
        memory_budget = "100MiB"
        [models.smollm2]
        path = "{smollm2}"
        dtype = "bfloat16"
    """)
    done = plan(too_small)
    assert done.returncode == 1
    assert "does not fit: the eager models (smollm2) need" in done.stdout
    assert "memory_budget of 0.10 GiB" in done.stdout

    done = plan(str(tmp_path / "nowhere.toml"))
    assert done.returncode == 2 and "cannot read the model catalog" in done.stderr


def test_a_70b_model_on_two_80gb_gpus(tmp_path):
    """The README's worked example: Llama-3.1-70B's published config, sized without weights."""
    from pathlib import Path

    example = Path(__file__).resolve().parents[2] / "docs" / "examples"
    done = plan(str(example / "llama70b.toml"), "--gpu-memory", "80GiB", "--gpus", "2")
    assert done.returncode == 0, done.stdout + done.stderr
    row = next(line for line in done.stdout.splitlines() if line.startswith("llama70b"))
    assert row.split()[1:4] == ["70.55", "B", "bfloat16"]
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    assert done.stdout.strip() in readme, "the README shows this plan's output verbatim"


def test_the_readme_catalog_reads_as_documented(tmp_path):
    """The README's catalog example is a valid catalog that means what the README says."""
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    example = next(block for block in re.findall(r"```toml\n(.*?)```", readme, flags=re.S)
                   if "[models.llama8b]" in block)
    config = ServerConfig.from_catalog(write(tmp_path, example))
    assert config.memory_budget == 16 * 1024**3
    assert config.load_mode("smollm2") == "on_demand" and config.pinned("llama8b")
    assert config.load_options("llama8b")["max_memory"] == {0: 20 * 1024**3, "cpu": 30 * 1024**3}
    assert config.load_options("llama8b")["offload_folder"] == str(tmp_path / "offload")
    on_ray = example.replace('load = "on_demand"', "") + "replicas = 2\nresources = { gpus = 1 }\n"
    ray = write(tmp_path, on_ray)
    config = ServerConfig.from_catalog(ray, backend="ray", isolation="none")
    assert config.replicas == {"llama8b": 2} and config.replica_resources == {"llama8b": {"num_gpus": 1.0}}
