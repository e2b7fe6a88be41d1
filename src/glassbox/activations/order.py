"""The order in which a model produces the outputs of some of its modules.

Offers:
    run_order(model, paths) -> list[str]     ``paths`` sorted by when the model's forward first
                                             RETURNS from each module; raises ValueError for a
                                             module that never runs or does not output
                                             [batch, positions, hidden]

The extraction block reads ``module.output`` of each path in turn, and a trace serves outputs
only in the order the forward pass produces them. That order is when each module's forward
returns, not when it starts: a module nested in another (``layers[1].mlp`` in ``layers[1]``)
returns first, so it is read before its parent, and siblings are read in the order they run,
whatever order the model's ``__init__`` defines them in. A module the model calls several times
is read at its first call (the one the plain ``register_forward_hook`` sees first), so it is
placed by its first return.

The order is measured, not guessed: one ``model.scan`` of a short input (fake tensors: no
weights are loaded and nothing is computed, so it costs a fraction of a second and works for a
client of a remote model, whose weights are on the meta device) with a forward hook on each
module. The client sends the block with this order, so a server runs the same one. A model the
scan cannot run (an op with no fake-tensor support, e.g. data-dependent routing) falls back to
the module tree's post-order (children before their parent, siblings as defined), which is the
run order of the usual transformer; the block then still fails clearly if that is wrong.
"""

from __future__ import annotations

from typing import Any

import torch

from ..envoy import module_of

_PROBE_TEXT = "The order in which a model runs its modules."


def run_order(model: Any, paths: list[str]) -> list[str]:
    """``paths`` in the order the model's forward returns from them (see the module docstring)."""
    root = module_of(model)
    returned: dict[str, tuple[int, Any]] = {}  # path -> (rank of its first return, what it output)
    handles = []
    for path in paths:
        def hook(module: Any, args: Any, output: Any, path: str = path) -> None:
            if path not in returned:
                returned[path] = (len(returned), _described(output))
        handles.append(root.get_submodule(path).register_forward_hook(hook))
    try:
        with torch.no_grad(), model.scan(_probe_input(model)):
            pass
    except Exception:  # ordering only: a fault of the model shows in the real trace, said there
        return sorted(paths, key=_post_order(root).__getitem__)
    finally:
        for handle in handles:
            handle.remove()
    never = [path for path in paths if path not in returned]
    if never:
        raise ValueError(f"modules: {', '.join(never)} never ran in a forward pass of the model (tried on a "
                         "short text), so there is no output to extract; pick modules the forward calls")
    for path in paths:
        output = returned[path][1]
        if not isinstance(output, tuple) or len(output) != 3:
            shown = f"a tensor of shape {output}" if isinstance(output, tuple) else output
            raise ValueError(f"modules: {path} outputs {shown}, not [batch, positions, hidden]; pick "
                             "another module")
    return sorted(paths, key=lambda path: returned[path][0])


def _probe_input(model: Any) -> dict[str, torch.Tensor]:
    # the same form the block gives the model: input_ids and attention_mask, [1, tokens]
    encoded = model.tokenizer(_PROBE_TEXT, return_tensors="pt")
    ids = encoded["input_ids"]
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _described(output: Any) -> Any:
    """A tensor output's shape (a tuple's first tensor: attention modules return (hidden, ...)),
    else a few words naming what it is."""
    if isinstance(output, tuple) and output:
        output = output[0]
    if isinstance(output, torch.Tensor):
        return tuple(output.shape)
    return f"a {type(output).__name__}"


def _post_order(root: torch.nn.Module) -> dict[str, int]:
    """Every submodule path -> its rank when children come before their parent."""
    order: dict[str, int] = {}

    def visit(module: torch.nn.Module, path: str) -> None:
        for name, child in module.named_children():
            visit(child, f"{path}.{name}" if path else name)
        order.setdefault(path, len(order))

    visit(root, "")
    return order
