"""What autograd saves between forward and backward, traced once per (model, batch, seq_len, dtype).

The model runs once under a ``FakeTensorMode`` (CPU kernels chosen, nothing allocated, no weights) inside
``torch.autograd.graph.saved_tensors_hooks``, with frozen weights and a rank-1 PEFT LoRA adapter on every
planned linear — exactly the situation of LoRA training. Tensors saved inside the LoRA layers are set
apart: a plan's own ranks add them back per module (``planner.memory.breakdown``).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any
from unittest import mock

import torch

from planner.memory.weights import LORA_DTYPE, elem
from planner.model_info import ModelInfo, meta_model_from_config
from qra_plugin.errors import QRAError
from qra_plugin.modules import find_blocks
from qra_plugin.prune import prune_blocks, to_fake_cpu


@dataclass(frozen=True)
class ActivationTrace:
    """What autograd saves in one forward of the model with a rank-1 LoRA adapter on every planned linear."""

    blocks_saved: tuple[int, ...]  # bytes saved by the base graph (not by LoRA layers) while each block ran
    head_saved: int  # bytes saved after the last block (final norm, lm_head, loss)
    loss_saved: int  # the part of head_saved saved after lm_head ran: transformers' loss on the full logits
    pre_saved: int  # bytes saved before the first block (embedding side)
    block_input: int  # bytes of one block's hidden-state input (what gradient checkpointing keeps)
    input_bytes: dict[str, int]  # planned linear name -> bytes of its input tensor
    input_key: dict[str, Hashable]  # planned linear name -> id of its input storage (shared inputs share it)
    input_saved: dict[str, bool]  # whether the base graph (not LoRA) already saves that input
    input_grad: dict[str, bool]  # whether that input requires grad (else a quantized layer's autograd saves nothing)
    lora_saved: dict[str, tuple[tuple[Hashable, int], ...]]  # name -> (storage id, bytes) lora_A saved
    base_keys: frozenset[Hashable]  # storages the base graph saves
    logits_elems: int  # batch * seq * vocab
    tokens: int = 0  # batch * seq
    batch: int = 0


def _storage_key(t: torch.Tensor) -> int:
    return t.untyped_storage()._cdata


class _Recorder:
    """Saved-tensor bookkeeping during the traced forward: which storage was saved, in which block, by whom."""

    def __init__(self, params: set[int], names: list[str]) -> None:
        self.params = params
        # phase: -1 before the blocks, i inside block i, n_blocks after them, n_blocks + 1 after lm_head (loss)
        self.phase, self.in_lora, self.in_a = -1, 0, None
        self.saved: dict[int, list[int]] = {}  # storage key -> [bytes, phase, saved_by_base]
        self.lora_saved: dict[str, dict[int, int]] = {n: {} for n in names}
        self.input_bytes: dict[str, int] = {}
        self.input_key: dict[str, int] = {}
        self.input_grad: dict[str, bool] = {}
        self.block_input: list[int] = []
        self.hooks: list[Any] = []
        # every tensor whose storage id is recorded stays referenced until the trace ends: a freed storage's id
        # is reused by the next one (below fp32 many cast copies come and go), which would merge two tensors
        self.alive: list[torch.Tensor] = []

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        k = _storage_key(t)
        if k in self.params:
            return t
        self.alive.append(t)
        entry = self.saved.setdefault(k, [t.untyped_storage().nbytes(), self.phase, 0])
        if not self.in_lora:
            entry[2] = 1
        if self.in_a is not None:
            self.lora_saved[self.in_a][k] = entry[0]
        return t

    def watch_block(self, i: int, block: torch.nn.Module) -> None:
        def pre(module: Any, args: Any, kwargs: Any) -> None:
            self.phase = i
            if i == 0:
                hidden = args[0] if args else kwargs["hidden_states"]
                self.block_input.append(hidden.untyped_storage().nbytes())

        def post(module: Any, args: Any, out: Any) -> None:
            self.phase = i + 1

        self.hooks += [block.register_forward_pre_hook(pre, with_kwargs=True), block.register_forward_hook(post)]

    def watch_head(self, head: torch.nn.Module | None, n_blocks: int) -> None:
        """What is saved after the output layer ran belongs to the loss (priced by loss path, not traced)."""
        if head is None:
            return

        def post(module: Any, args: Any, out: Any) -> None:
            self.phase = n_blocks + 1

        self.hooks.append(head.register_forward_hook(post))

    def watch_linear(self, name: str, layer: torch.nn.Module) -> None:
        def lin_pre(module: Any, args: tuple[torch.Tensor, ...]) -> None:
            self.input_bytes[name] = args[0].untyped_storage().nbytes()
            self.input_key[name] = _storage_key(args[0])
            self.input_grad[name] = args[0].requires_grad
            self.alive.append(args[0])

        def enter(*_: Any) -> None:
            self.in_lora += 1

        def leave(*_: Any) -> None:
            self.in_lora -= 1

        def a_pre(*_: Any) -> None:
            self.in_a = name

        def a_post(*_: Any) -> None:
            self.in_a = None

        lora_a, lora_b = next(iter(layer.lora_A.values())), next(iter(layer.lora_B.values()))  # ModuleDicts
        self.hooks.append(layer.register_forward_pre_hook(lin_pre))
        for adapter in (lora_a, lora_b):
            self.hooks += [adapter.register_forward_pre_hook(enter), adapter.register_forward_hook(leave)]
        self.hooks += [lora_a.register_forward_pre_hook(a_pre), lora_a.register_forward_hook(a_post)]

    def trace(self, info: ModelInfo, n_blocks: int, batch: int, seq_len: int, dtype: torch.dtype) -> ActivationTrace:
        blocks_saved = [0] * n_blocks
        pre_saved = head_saved = loss_saved = 0
        base_keys = set()
        for k, (nbytes, ph, by_base) in self.saved.items():
            if not by_base:
                continue
            base_keys.add(k)
            if ph < 0:
                pre_saved += nbytes
            elif ph >= n_blocks:
                head_saved += nbytes
                loss_saved += nbytes if ph > n_blocks else 0
            else:
                blocks_saved[ph] += nbytes
        one_input = self.block_input[0] if self.block_input else batch * seq_len * info.hidden_size * elem(dtype)
        return ActivationTrace(
            blocks_saved=tuple(blocks_saved),
            head_saved=head_saved,
            loss_saved=loss_saved,
            pre_saved=pre_saved,
            block_input=one_input,
            input_bytes=self.input_bytes,
            input_key=self.input_key,
            input_saved={name: k in base_keys for name, k in self.input_key.items()},
            input_grad=self.input_grad,
            lora_saved={name: tuple(v.items()) for name, v in self.lora_saved.items()},
            base_keys=frozenset(base_keys),
            logits_elems=batch * seq_len * info.vocab_size,
            tokens=batch * seq_len,
            batch=batch,
        )


def trace_activations(
    info: ModelInfo, batch: int, seq_len: int, dtype: torch.dtype, adapter_dtype: torch.dtype = LORA_DTYPE
) -> ActivationTrace:
    """Run the model once in a ``FakeTensorMode`` (CPU kernels, no memory) and record what autograd saves.

    Every planned linear gets a rank-1 LoRA adapter (PEFT, as in training) so activations require grad
    exactly where they do in LoRA training. Tensors saved inside the LoRA layers are set apart: the
    plan's own ranks add them back per module (``planner.memory.breakdown``). ``adapter_dtype``: fp32
    (PEFT's default upcast) or the model's dtype (``autocast_adapter_dtype=False``).
    """
    key = ("trace", batch, seq_len, dtype) + (() if adapter_dtype == LORA_DTYPE else (adapter_dtype,))
    if key in info.memo:
        return info.memo[key]
    if info.block_sources is not None:
        info.memo[key] = _composed_trace(info, batch, seq_len, dtype, adapter_dtype)
        return info.memo[key]
    if info.config is None:
        raise QRAError("this ModelInfo has no config; build it with planner.model_info.load_model_info")
    from peft import LoraConfig, get_peft_model
    from torch._subclasses.fake_tensor import FakeTensorMode

    base = meta_model_for_trace(info, dtype)
    config = LoraConfig(r=1, target_modules=[s.name for s in info.linears])
    model = get_peft_model(base, config, autocast_adapter_dtype=adapter_dtype == LORA_DTYPE)
    mode = FakeTensorMode()
    to_fake_cpu(model, mode)
    model.train()
    params = {_storage_key(p) for p in model.parameters()} | {_storage_key(b) for b in model.buffers()}
    recorder = _Recorder(params, [s.name for s in info.linears])
    _, blocks = find_blocks(base)
    for i, block in enumerate(blocks):
        recorder.watch_block(i, block)
    for spec in info.linears:
        recorder.watch_linear(spec.name, base.get_submodule(spec.name))
    recorder.watch_head(base.get_output_embeddings(), len(blocks))
    try:
        with _unpacked_sequences(), mode, torch.autograd.graph.saved_tensors_hooks(recorder.pack, lambda t: t):
            ids = torch.zeros(batch, seq_len, dtype=torch.long)
            out = model(input_ids=ids, labels=ids, use_cache=False)
        del out
    finally:
        for h in recorder.hooks:
            h.remove()
    info.memo[key] = recorder.trace(info, len(blocks), batch, seq_len, dtype)
    return info.memo[key]


def _composed_trace(
    info: ModelInfo, batch: int, seq_len: int, dtype: torch.dtype, adapter_dtype: torch.dtype
) -> ActivationTrace:
    """The trace of a model whose blocks are pruned differently: each block's part from the trace of the
    model pruned uniformly like it (a block saves the same tensors whatever its neighbours keep). Storage
    ids are tagged with their source so ids of different traces never collide."""
    assert info.block_sources is not None
    sources = {id(src): src for src in info.block_sources}
    traces = {k: trace_activations(src, batch, seq_len, dtype, adapter_dtype) for k, src in sources.items()}
    block_of = {s.name: s.block for s in info.linears}
    tagged = {k: frozenset((k, key) for key in t.base_keys) for k, t in traces.items()}
    edge = traces[id(info.block_sources[0])]  # embedding side, head and block input do not change
    picked = {name: traces[id(info.block_sources[b])] for name, b in block_of.items()}
    tag = {name: id(info.block_sources[b]) for name, b in block_of.items()}
    return ActivationTrace(
        blocks_saved=tuple(traces[id(src)].blocks_saved[b] for b, src in enumerate(info.block_sources)),
        head_saved=edge.head_saved,
        loss_saved=edge.loss_saved,
        pre_saved=edge.pre_saved,
        block_input=edge.block_input,
        input_bytes={n: picked[n].input_bytes[n] for n in block_of},
        input_key={n: (tag[n], picked[n].input_key[n]) for n in block_of},
        input_saved={n: picked[n].input_saved[n] for n in block_of},
        input_grad={n: picked[n].input_grad[n] for n in block_of},
        lora_saved={n: tuple(((tag[n], k), b) for k, b in picked[n].lora_saved[n]) for n in block_of},
        base_keys=frozenset().union(*tagged.values()),
        logits_elems=edge.logits_elems,
        tokens=edge.tokens,
        batch=edge.batch,
    )


def _unpacked_sequences() -> Any:
    """Tell transformers the batch is not packed, as it finds itself for real data.

    With fake tensors it cannot look at position ids, so it would assume packing and build a dense
    mask, which changes the SDPA path (no GQA, a saved mask) from what training really runs.
    """

    import transformers.masking_utils as masking

    if not hasattr(masking, "find_packed_sequence_indices"):
        return contextlib.nullcontext()
    return mock.patch.object(masking, "find_packed_sequence_indices", lambda position_ids: None)


def meta_model_for_trace(info: ModelInfo, dtype: torch.dtype) -> torch.nn.Module:
    """``info``'s model on the meta device, with SDPA attention and ``info.pruning`` applied."""
    config = copy.deepcopy(info.config)
    # SDPA is what training uses on CPU and GPU; the eager path would save the seq x seq attention matrix.
    if getattr(config, "_attn_implementation", None) in (None, "eager") and hasattr(config, "_attn_implementation"):
        config._attn_implementation = "sdpa"
    model = meta_model_from_config(config, dtype)
    if info.pruning:
        prune_blocks(model, info.pruning)
    return model
