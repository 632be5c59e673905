"""Measure the activation memory of a training forward: the bytes of the storages that stay alive after the
forward for the backward, device-independent (no allocator statistics needed).

Two collectors cover every way a tensor is kept: `saved_tensors_hooks` sees what autograd saves outside a
checkpoint, and a dispatch mode sees every tensor an op creates (a checkpoint's kept inputs, a selective
checkpoint's cached outputs). After the forward, the storages still referenced by any of them, less the
parameters', are the activations. Used by benchmarks/activation_memory.py and the memory estimator's test.
"""

from __future__ import annotations

import gc
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class _Recorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.tensors: list[weakref.ref] = []

    def keep(self, tensor: torch.Tensor) -> None:
        self.tensors.append(weakref.ref(tensor))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for leaf in tree_leaves(out):
            if isinstance(leaf, torch.Tensor):
                self.keep(leaf)
        return out


def live_bytes(recorder: _Recorder, exclude: set[int]) -> int:
    """Bytes of the distinct storages that recorded tensors still hold, less `exclude` (data pointers)."""
    gc.collect()
    storages = {}
    for ref in recorder.tensors:
        tensor = ref()
        if tensor is None or tensor.device.type == "meta":
            continue
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in exclude and storage.nbytes():
            storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def activation_bytes(model: torch.nn.Module, input_ids: torch.Tensor) -> int:
    """Bytes kept for backward by one training forward of `model` (an `MhcForCausalLM`) on `input_ids`, with
    the labels = input_ids loss; the graph is freed before returning."""
    params = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    recorder = _Recorder()

    def pack(tensor):
        recorder.keep(tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), recorder:
        loss = model(input_ids, labels=input_ids).loss
    kept = live_bytes(recorder, params | {loss.untyped_storage().data_ptr()})
    del loss
    return kept
