"""GPU checks of serving from a catalog: bf16 on the GPU through `glassbox serve`, remote equals local
on the same device, and a model split GPU+CPU by max_memory equals it unsplit.

Run on a machine with a CUDA GPU (the test suite never needs one):

    GLASSBOX_CACHE=<cache with gpt2-tokenizer> GLASSBOX_SMOLLM2=<dir> PYTHONPATH=src \\
        python bench/gpu_serve_check.py

``GLASSBOX_SMOLLM2``: a SmolLM2-135M folder. With weights it is served as is; with only its config
and tokenizer (the 538 MB checkpoint does not travel to a lent GPU machine) the same architecture
is built with seeded random weights: every check compares two runs of the same weights, so what
they are does not matter. Prints PASS / FAIL lines; exits 1 if a check fails.

    .venv/bin/python bench/gpu_serve_check.py --quick   # no GPU needed: the CPU-checkable part, ~1 min

``--quick`` runs what a CPU can check, with the tiny Llama in place of SmolLM2: a catalog serving it
in bf16 on the CPU (``device_map = "cpu"``, ``--isolation none`` as on the GPU), remote equal to
local bit for bit, and /v1/models. The GPU-only checks (a CUDA model refused under
``--isolation process``; a model split GPU+CPU by ``max_memory``) are printed as SKIP.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import textwrap
import traceback

import httpx
import torch

from glassbox import CONFIG, LanguageModel
from glassbox.cli import start_server

PROMPT = "The Eiffel Tower is in the city of"
failures: list[str] = []


def check(name: str, ok: bool, detail: str = "") -> None:
    print(f"{'PASS' if ok else 'FAIL'}  {name}  {detail}", flush=True)
    if not ok:
        failures.append(name)


def smollm2(root: str) -> str:
    source = os.environ.get("GLASSBOX_SMOLLM2")
    if not source:
        from glassbox.offline import smollm2_path

        return str(smollm2_path())
    if os.path.exists(os.path.join(source, "model.safetensors")):
        return source
    from transformers import AutoConfig, AutoModelForCausalLM

    out = os.path.join(root, "smollm2-random")
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(source)).save_pretrained(out)
    for name in os.listdir(source):
        if name != "config.json":
            shutil.copy(os.path.join(source, name), out)
    return out


EDIT, KEEP = 3, 20  # layers edited and saved by trace(): SmolLM2 has 30; --quick's tiny Llama 4 (1, 3)


def trace(model: LanguageModel, **kwargs) -> dict[str, torch.Tensor]:
    with model.trace(PROMPT, **kwargs):
        model.model.layers[EDIT].output[0][:, -1] *= 0.5
        hidden = model.model.layers[KEEP].output[0].save()
        logits = model.lm_head.output.save()
    return {"hidden": hidden.float().cpu(), "logits": logits.float().cpu()}


def diff(a: dict, b: dict) -> float:
    return max((a[k] - b[k]).abs().max().item() for k in a)


def skip(name: str, why: str) -> None:
    print(f"SKIP  {name}  ({why})", flush=True)


def main(argv: list[str] | None = None) -> int:
    global EDIT, KEEP
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="no GPU needed: serve the tiny Llama in bf16 on the CPU, remote equals local; "
                             "the GPU-only checks are printed as SKIP")
    args = parser.parse_args(argv)
    quick = args.quick
    if not quick and not torch.cuda.is_available():
        parser.error("no CUDA GPU here: run it on a GPU machine, or `--quick` for the checks a CPU can do")
    device = "cpu" if quick else "cuda:0"
    print(f"torch {torch.__version__}, {'CPU (--quick)' if quick else torch.cuda.get_device_name(0)}")
    root = tempfile.mkdtemp()
    if quick:
        from glassbox.offline import tiny_llama_path

        path, name, EDIT, KEEP = str(tiny_llama_path()), "tiny", 1, 3
        torch.set_num_threads(1)  # the server's worker too: bit-for-bit needs the same kernels
        threads = ["--torch-threads", "1"]
    else:
        path, name, threads = smollm2(root), "smollm2", []
    split_memory = {0: 100 * 2**20, "cpu": 4 * 2**30}  # ~1/3 of bf16 SmolLM2 on the GPU
    catalog = os.path.join(root, "catalog.toml")
    with open(catalog, "w") as file:
        file.write(textwrap.dedent(f"""
            [models.{name}]
            path = "{path}"
            dtype = "bfloat16"
            device_map = "{device}"
        """))
        if not quick:
            file.write(textwrap.dedent(f"""
                [models.split]
                path = "{path}"
                dtype = "bfloat16"
                device_map = "auto"
                max_memory = {{ "0" = "100MiB", cpu = "4GiB" }}
            """))
    refused = "a GPU model under --isolation process is refused at start"
    if quick:
        skip(refused, "needs CUDA")
    else:
        try:
            start_server({}, state_dir=os.path.join(root, "refused"), args=["--models-file", catalog],
                         timeout=300)
            check(refused, False, "it started")
        except RuntimeError as err:
            check(refused, "CUDA does not survive" in str(err), str(err).strip().splitlines()[-1][:160])
    server = start_server({}, state_dir=os.path.join(root, "state"),
                          args=["--models-file", catalog, "--isolation", "none", *threads], timeout=600)
    try:
        CONFIG.HOST, CONFIG.API_KEY = server.url, server.create_key("gpu")
        local = LanguageModel(path, dtype=torch.bfloat16, device_map=device, dispatch=True)
        expected = trace(local)
        remote = trace(LanguageModel(name), remote=True)
        check(f"bf16 on the {'CPU' if quick else 'GPU'}: remote equals local, bit for bit",
              all(torch.equal(remote[k], expected[k]) for k in expected),
              f"max |diff| {diff(remote, expected):.2e}")
        if quick:
            for what in ("max_memory split the model over GPU and CPU",
                         "split GPU+CPU equals unsplit (local)", "split GPU+CPU: remote equals local"):
                skip(what, "needs CUDA")
        else:
            split = LanguageModel(path, dtype=torch.bfloat16, device_map="auto", max_memory=split_memory,
                                  dispatch=True)
            placed = sorted({str(d) for d in split._module.hf_device_map.values()})
            check("max_memory split the model over GPU and CPU", placed == ["0", "cpu"], f"devices {placed}")
            local_split = trace(split)
            check("split GPU+CPU equals unsplit (local)", diff(local_split, expected) <= 1e-2,
                  f"max |diff| {diff(local_split, expected):.2e} (bf16)")
            remote_split = trace(LanguageModel("split"), remote=True)
            check("split GPU+CPU: remote equals local", diff(remote_split, local_split) <= 1e-2,
                  f"max |diff| {diff(remote_split, local_split):.2e}; "
                  f"vs unsplit {diff(remote_split, expected):.2e}")
        for info in httpx.get(server.url + "/v1/models", headers={"X-API-Key": CONFIG.API_KEY},
                              timeout=30).json()["models"]:  # state and last use need a key
            print(f"INFO  /v1/models {info['name']}: state {info.get('state')}, "
                  f"~{info.get('bytes', 0) / 2**20:.0f} MiB estimated")
    except Exception:
        traceback.print_exc()
        check("serving checks ran", False)
    finally:
        server.stop()
        print(server.output()[-3000:])
    print(f"{len(failures)} failed: {failures}" if failures else "all checks passed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
