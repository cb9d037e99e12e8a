"""Pruning a Checkpoint: zeros inside matrices (unstructured, N:M) or smaller matrices (FFN channels, kv-head
groups, whole layers). Every function returns a new Checkpoint and leaves its input untouched; the new one's
metadata["pruning"] lists what was done (method, amount, what was removed, parameter counts).

>>> from jisu.loader.resolve import load_checkpoint
>>> from jisu.prune import prune
>>> small = prune(load_checkpoint(None), "ffn", 0.25)        # 25% of FFN channels, by calibration activations
>>> sparse = prune(load_checkpoint(None), "unstructured", 0.5)

See unstructured.py and structured.py for the methods and their importance scores; `jisu prune` (cli.py)
saves the result as a Hugging Face folder.
"""

# NOTE: lazy, so that `jisu --help` (which registers `jisu prune`) does not import torch.
import importlib

__all__ = ['METHODS', 'SCORES', 'ActivationStats', 'PruneError', 'calibration_prompts', 'collect_stats', 'count_nonzero', 'count_parameters', 'ffn_scores', 'head_group_scores', 'heads_to_remove', 'layer_scores', 'linear_weight_names', 'magnitude_prune', 'nm_prune', 'parse_nm', 'prune', 'prune_ffn', 'prune_heads', 'prune_layers']


def __getattr__(name: str):
    if name in __all__:
        return getattr(importlib.import_module("jisu.prune.api"), name)
    raise AttributeError(f"module 'jisu.prune' has no attribute {name!r}")
