"""nnsight 0.8.1 side of ``bench/smollm2.py``: runs in the peers virtualenv (``.venv-peers``).

    HF_HUB_OFFLINE=1 .venv-peers/bin/python bench/_nnsight_smollm2_worker.py \\
        --model-path ~/.cache/glassbox/smollm2-135m-instruct [--quick] [--all]

Loads SmolLM2 from the local folder with nnsight's ``TransformersModel`` (task
text-generation; ``LanguageModel`` is its deprecated alias in 0.8.1), builds the cases of
``smollm2.py`` (the same trace bodies glassbox runs), checks that nnsight's values equal
plain hooks' in this process, and times the raw variant and nnsight.

Protocol with the main process, one JSON document per line on stdout: after preparing it
prints ``{"ready": true, "versions": ...}``; then reads commands on stdin:
``{"round": r}`` (answered ``{"done": r}``) and ``{"results": true}`` (answered with every
number, then it exits). With ``--all`` it runs every round alone and prints only the
results. Progress goes to stderr; stdout carries only the protocol.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the model is a local folder: never download
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _cases  # needs the path above
import _peer
import smollm2


def prepare(model_path: str, settings: _cases.Settings) -> smollm2.Rounds:
    from nnsight import TransformersModel
    from transformers import AutoTokenizer

    # nnsight's pipeline cannot infer this folder's tokenizer class: hand it the tokenizer.
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = TransformersModel(model_path, task="text-generation", tokenizer=tokenizer, dispatch=True)
    hf = model._module
    hf.eval()
    inputs = smollm2.make_inputs(model.tokenizer)
    raw, hooks = smollm2.raw_cases(hf, inputs), smollm2.hook_cases(hf, inputs)
    traced = smollm2.traced_cases(model, "nnsight")
    _cases.log("nnsight: checking values before timing")
    smollm2.check_variant("nnsight", hooks, traced)
    jobs = {case: {"raw": raw[case], "nnsight": traced[case]} for case in smollm2.CASES}
    _cases.log("nnsight: warming up")
    return smollm2.Rounds(jobs, settings, "nnsight")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model-path", required=True, help="the prepared SmolLM2 folder")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--all", action="store_true", help="run every round alone, print the results")
    args = parser.parse_args()

    send = _peer.worker_protocol()
    smollm2.configure_torch()
    versions = _peer.peer_versions()
    import nnsight

    settings = smollm2.settings_for(args.quick)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", nnsight.NNsightDeprecationWarning)
        rounds = prepare(args.model_path, settings)
    if args.all:
        for r in range(settings.rounds):
            rounds.run(r)
    else:
        def run_round(r: int) -> dict:
            rounds.run(r)
            return {"done": r}

        _peer.answer_commands(send, versions, "round", run_round)
    send({"versions": versions, "results": rounds.results()})


if __name__ == "__main__":
    main()
