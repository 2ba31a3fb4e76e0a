"""Real activations of single blocks, for the tools that time one block outside a whole run
(`profile_final_block.py`, `bench_speed_floor.py`)."""

from __future__ import annotations

from typing import Any, Iterable

import torch

from lfq_export.activations import ActivationStore


def block_inputs(net: torch.nn.Module, ids: torch.Tensor, rows: Iterable[int], blocks: Iterable[int],
                 hidden: int) -> dict[int, ActivationStore]:
    """The inputs of `blocks` (hidden_states[k] is block k's input) for calibration windows `rows`,
    from one forward of `net` per window."""
    rows, blocks = list(rows), list(blocks)
    stores = {k: ActivationStore((len(rows), ids.shape[1], hidden), torch.float32, None) for k in blocks}
    with torch.no_grad():
        for j, i in enumerate(rows):
            hs = net(ids[i : i + 1], output_hidden_states=True).hidden_states
            for k, store in stores.items():
                store.set(slice(j, j + 1), hs[k])
    return stores


def fp_output(block: torch.nn.Module, kw: dict[str, Any], store: ActivationStore) -> ActivationStore:
    """The FP block's outputs on `store`, as a new store (the training target)."""
    out = ActivationStore(store.shape, torch.float32, None)
    with torch.no_grad():
        for i in range(len(store)):
            out.set(slice(i, i + 1), block(store.get(slice(i, i + 1)), **kw))
    return out
