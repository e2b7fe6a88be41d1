"""Nothing happens at import: ``import glassbox`` changes no builtin, torch or transformers class.

``.save()`` on lists, dicts, sets, tuples and tensors is mounted at the first trace (patches.py);
each check runs in a fresh interpreter, since this test process has traced long before.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

from waiting import HANG

_PROBE = textwrap.dedent("""
    import json, torch, transformers
    from transformers import GPT2LMHeadModel, LlamaForCausalLM, PreTrainedModel, PreTrainedTokenizerBase
    from transformers.utils.generic import ModelOutput

    CLASSES = {"torch.Tensor": torch.Tensor, "torch.nn.Module": torch.nn.Module,
               "PreTrainedModel": PreTrainedModel, "GPT2LMHeadModel": GPT2LMHeadModel,
               "LlamaForCausalLM": LlamaForCausalLM, "PreTrainedTokenizerBase": PreTrainedTokenizerBase,
               "ModelOutput": ModelOutput, "list": list, "dict": dict, "set": set, "tuple": tuple}

    def snapshot():
        # the names and the objects behind them: a replaced method counts as a change too
        return {name: {attr: repr(cls.__dict__[attr]) if attr in cls.__dict__ else "inherited"
                       for attr in dir(cls)} for name, cls in CLASSES.items()}

    def modules():
        return {"torch": sorted(vars(torch)), "transformers": sorted(vars(transformers))}

    before, before_modules = snapshot(), modules()
    import glassbox  # noqa: F401
    import glassbox.models.language  # noqa: F401  (what LanguageModel users import)
    after, after_modules = snapshot(), modules()
    changed = {name: sorted(set(before[name].items()) ^ set(after[name].items()))
               for name in CLASSES if before[name] != after[name]}
    print(json.dumps({
        "changed": {name: [attr for attr, _ in diff] for name, diff in changed.items()},
        "module_attrs": {m: sorted(set(after_modules[m]) ^ set(before_modules[m])) for m in after_modules},
        "save": [t.__name__ for t in (list, dict, set, tuple) if hasattr(t(), "save")],
        "tensor_save": hasattr(torch.ones(1), "save"),
    }))
""")


def _fresh(code: str) -> dict:
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=HANG)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_import_glassbox_patches_no_builtin_torch_or_transformers_class():
    seen = _fresh(_PROBE)
    assert seen["save"] == []
    assert seen["tensor_save"] is False
    assert seen["changed"] == {}
    assert seen["module_attrs"] == {"torch": [], "transformers": []}


def test_save_on_builtins_and_tensors_appears_at_the_first_trace_and_says_what_to_do_outside():
    seen = _fresh(textwrap.dedent("""
        import json, torch, glassbox
        net = glassbox.NNsight(torch.nn.Linear(2, 2))
        before = [t.__name__ for t in (list, dict, set, tuple, torch.Tensor) if hasattr(t, "save")]
        with net.trace(torch.ones(1, 2)):
            kept = [net.output].save()
        after = [t.__name__ for t in (list, dict, set, tuple, torch.Tensor) if hasattr(t, "save")]
        try:
            [].save()
            outside = "no error"
        except glassbox.TraceStateError as err:
            outside = str(err)
        print(json.dumps({"before": before, "after": after, "kept": len(kept), "outside": outside}))
    """))
    assert seen["before"] == []
    assert seen["after"] == ["list", "dict", "set", "tuple", "Tensor"]
    assert seen["kept"] == 1
    assert "belong inside `with model.trace(...)`" in seen["outside"]


def test_a_session_mounts_save_before_its_first_trace():
    seen = _fresh(textwrap.dedent("""
        import json, torch, glassbox
        net = glassbox.NNsight(torch.nn.Linear(2, 2))
        with net.session():
            outputs = [].save()       # before any trace of the session
            with net.trace(torch.ones(1, 2)):
                outputs.append(net.output)
        print(json.dumps({"kept": len(outputs)}))
    """))
    assert seen == {"kept": 1}
