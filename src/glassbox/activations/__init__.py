"""Activation datasets at scale: many modules over many texts, streamed to sharded safetensors.

Offers:
    extract(model, texts, modules=, out=, ...) -> ActivationDataset     (api.py)
    ActivationDataset(out)       read it back: ds[i], ds.torch(name), ds.numpy(name)  (dataset.py)

    from glassbox import LanguageModel, extract
    model = LanguageModel(path)
    ds = extract(model, texts, modules=[model.model.layers[5]], out="acts/", dtype="bfloat16")

Files: sources.py (texts), plan.py (arguments, reductions), order.py (the order the modules are
read in), batches.py (tokenize and pack), block.py (the trace block, local or on a server),
local.py / remote.py (the loops), writer.py (shards + index, atomic, resumable), progress.py (the
bar), dataset.py (reading).
"""

from .api import extract
from .dataset import ActivationDataset, Row, ShardedArray

__all__ = ["ActivationDataset", "Row", "ShardedArray", "extract"]
