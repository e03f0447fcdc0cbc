"""Predict the peak training memory of a plan, part by part, and compare plans with a budget.

Every byte count follows how the real libraries store things (checked against ``qra_plugin.weight_memory``
on real HQQ/bitsandbytes layers in ``tests/test_memory.py``):

* HQQ packs the (reshaped) weight along dim 0: 8 bit 1/byte, 4 bit 2/byte, 2 bit 4/byte (uint8), 3 bit
  10 per int32 (rows rounded up to 10); scale and zero are one value per group in the compute dtype,
  bias in the compute dtype.
* bitsandbytes nf4: two values per byte, double-quantized absmax (one uint8 per 64-block, plus fp32
  absmax per 256 of those, a 256-entry fp32 code and an fp32 offset) and the 16-entry nf4 code, per layer.
  int8: one byte per weight plus one fp32 scale (SCB) per output row.
* LoRA adapters are fp32 (PEFT upcasts bf16/fp16 adapters by default); gradients match them.

Activations are what autograd saves between forward and backward. The architecture-dependent part is
*traced*: the model is run once on the meta device (no memory, no weights) under
``torch.autograd.graph.saved_tensors_hooks`` with frozen weights and grad-requiring activations, exactly
the situation of LoRA training. Plan-dependent parts are added per module: each LoRA adapter saves its
input (once per distinct input tensor) and its rank-``r`` hidden; an HQQ layer (PyTorch backend) saves its
dequantized weight for the backward matmul; a bitsandbytes int8 layer on CPU saves its input.
The loss part: the HF causal-LM loss saves an fp32 log-softmax of the logits, and its backward holds two
more fp32 ``batch x seq x vocab`` buffers at once; that is the logits/loss term.

The peak is the largest of the moments of a step (``MemoryBreakdown.peak_phase``): the start of the
backward (activations + logits buffers), the recompute of one block under gradient checkpointing, and
the optimizer step (all LoRA gradients). ``benchmarks/memory_accuracy.py`` compares it with the
allocator-level peak of real training steps.
"""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from planner.model_info import ModelInfo, meta_model_from_config
from qra_plugin.errors import QRAError
from qra_plugin.modules import LinearSpec
from qra_plugin.plan import DEFAULT_HQQ_GROUP, ModulePlan, Plan

#: PEFT keeps adapters in fp32 (``autocast_adapter_dtype=True``), whatever the base dtype.
LORA_DTYPE = torch.float32

#: Optimizer state bytes per trainable parameter tensor, by HF ``optim`` name (see ``_optimizer_bytes``).
OPTIMIZERS = ("adamw_torch", "adamw_torch_fused", "adafactor", "sgd")


def _elem(dtype: torch.dtype) -> int:
    return torch.empty(0, dtype=dtype).element_size()


# ---------------------------------------------------------------- weights, per module
def hqq_bytes(spec: LinearSpec, plan: ModulePlan, compute_dtype: torch.dtype) -> int:
    """Bytes an ``HQQLinear`` holds: packed W_q + scale + zero (+ bias), as hqq 0.2.x stores them."""
    group = plan.group_size or DEFAULT_HQQ_GROUP[plan.bits]
    numel = spec.numel
    if numel % group:
        raise QRAError(f"{spec.name}: HQQ group_size {group} does not divide its {numel} weights")
    groups = numel // group
    rows, cols = (group, groups) if plan.axis == 0 else (groups, group)
    if plan.bits == 8:
        packed = rows * cols
    elif plan.bits == 4:
        packed = (rows // 2) * cols
    elif plan.bits == 2:
        packed = (rows // 4) * cols
    elif plan.bits == 3:
        packed = math.ceil(rows / 10) * cols * 4
    else:
        raise QRAError(f"{spec.name}: HQQ cannot store {plan.bits}-bit weights")
    elem = _elem(compute_dtype)
    return packed + 2 * groups * elem + (spec.out_features * elem if spec.bias else 0)


def bnb_bytes(spec: LinearSpec, plan: ModulePlan, compute_dtype: torch.dtype) -> int:
    """Bytes a bitsandbytes ``Linear4bit`` (nf4, double quant) or ``Linear8bitLt`` holds."""
    numel, elem = spec.numel, _elem(compute_dtype)
    bias = spec.out_features * elem if spec.bias else 0
    if plan.bits == 8:
        return numel + 4 * spec.out_features + bias
    if plan.bits != 4:
        raise QRAError(f"{spec.name}: bitsandbytes cannot store {plan.bits}-bit weights")
    storage = compute_dtype if compute_dtype in (torch.bfloat16, torch.float16) else torch.uint8
    store = _elem(storage)
    packed = math.ceil(math.ceil(numel / 2) / store) * store
    blocks = math.ceil(numel / 64)
    nested = math.ceil(blocks / 256)
    # absmax (uint8) + nested absmax (fp32) + nested code (256 fp32) + offset (fp32) + nf4 code (16 fp32)
    return packed + blocks + 4 * nested + 4 * 256 + 4 + 4 * 16 + bias


def base_module_bytes(spec: LinearSpec, plan: ModulePlan, compute_dtype: torch.dtype) -> int:
    """Bytes of a planned linear's base layer (quantized or kept in ``compute_dtype``)."""
    if plan.bits >= 16:
        return (spec.numel + (spec.out_features if spec.bias else 0)) * _elem(compute_dtype)
    if plan.backend == "hqq":
        return hqq_bytes(spec, plan, compute_dtype)
    if plan.backend == "bnb":
        return bnb_bytes(spec, plan, compute_dtype)
    raise QRAError(f"{spec.name}: no backend stores {plan.bits}-bit weights as {plan.backend!r}")


def lora_numel(spec: LinearSpec, rank: int) -> int:
    return rank * (spec.in_features + spec.out_features)


def _optimizer_bytes(optimizer: str, shapes: Iterable[tuple[int, int]]) -> int:
    """Optimizer state bytes for fp32 trainable tensors of the given 2-D shapes, as torch/HF store them."""
    total = 0
    for rows, cols in shapes:
        if optimizer in ("adamw_torch", "adamw_torch_fused"):
            total += 2 * rows * cols * 4 + 4  # exp_avg, exp_avg_sq, fp32 ``step`` tensor
        elif optimizer == "adafactor":
            total += (rows + cols) * 4 + 4  # factored second moment + 0-dim RMS tensor (HF, beta1=None)
        elif optimizer == "sgd":
            total += 0
        else:
            raise QRAError(f"unknown optimizer {optimizer!r} (supported: {', '.join(OPTIMIZERS)})")
    return total


# ---------------------------------------------------------------- activations, traced once
@dataclass(frozen=True)
class ActivationTrace:
    """What autograd saves in one forward of the model with a rank-1 LoRA adapter on every planned linear."""

    blocks_saved: tuple[int, ...]  # bytes saved by the base graph (not by LoRA layers) while each block ran
    head_saved: int  # bytes saved after the last block (final norm, lm_head, loss)
    pre_saved: int  # bytes saved before the first block (embedding side)
    block_input: int  # bytes of one block's hidden-state input (what gradient checkpointing keeps)
    input_bytes: dict[str, int]  # planned linear name -> bytes of its input tensor
    input_key: dict[str, int]  # planned linear name -> id of its input storage (shared inputs share it)
    input_saved: dict[str, bool]  # whether the base graph (not LoRA) already saves that input
    lora_saved: dict[str, tuple[tuple[int, int], ...]]  # name -> (storage id, bytes) lora_A saved (input or cast)
    base_keys: frozenset[int]  # storages the base graph saves
    logits_elems: int  # batch * seq * vocab


_TRACES: dict[tuple[Any, ...], ActivationTrace] = {}


def _storage_key(t: torch.Tensor) -> int:
    return t.untyped_storage()._cdata


def trace_activations(info: ModelInfo, batch: int, seq_len: int, dtype: torch.dtype) -> ActivationTrace:
    """Run the model once in a ``FakeTensorMode`` (CPU kernels, no memory) and record what autograd saves.

    Every planned linear gets a rank-1 LoRA adapter (PEFT, as in training) so activations require grad
    exactly where they do in LoRA training. Tensors saved inside the LoRA layers are set apart: the
    plan's own ranks add them back per module (``_module_cost``).
    """
    key = (id(info), info.fingerprint, batch, seq_len, dtype)
    if key in _TRACES:
        return _TRACES[key]
    if info.config is None:
        raise QRAError("this ModelInfo has no config; build it with planner.model_info.load_model_info")
    from peft import LoraConfig, get_peft_model
    from torch._subclasses.fake_tensor import FakeTensorMode

    from qra_plugin.modules import find_blocks

    base = _meta_model(info, dtype)
    model = get_peft_model(base, LoraConfig(r=1, target_modules=[s.name for s in info.linears]))
    mode = FakeTensorMode()
    _to_fake_cpu(model, mode)
    model.train()
    params = {_storage_key(p) for p in model.parameters()} | {_storage_key(b) for b in model.buffers()}
    _, blocks = find_blocks(base)
    state: dict[str, Any] = {"phase": -1, "lora": 0, "in_a": None}  # phase: -1 before blocks, i in block i
    lora_saved: dict[str, dict[int, int]] = {s.name: {} for s in info.linears}
    saved: dict[int, list[int]] = {}  # storage key -> [bytes, phase, saved_by_base]
    input_bytes: dict[str, int] = {}
    input_key: dict[str, int] = {}
    block_input: list[int] = []
    hooks = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        k = _storage_key(t)
        if k in params:
            return t
        entry = saved.setdefault(k, [t.untyped_storage().nbytes(), state["phase"], 0])
        if not state["lora"]:
            entry[2] = 1
        if state["in_a"] is not None:
            lora_saved[state["in_a"]][k] = entry[0]
        return t

    def enter(*_: Any) -> None:
        state["lora"] += 1

    def leave(*_: Any) -> None:
        state["lora"] -= 1

    for i, block in enumerate(blocks):

        def pre(module: Any, args: Any, kwargs: Any, i: int = i) -> None:
            state["phase"] = i
            if i == 0:
                hidden = args[0] if args else kwargs["hidden_states"]
                block_input.append(hidden.untyped_storage().nbytes())

        def post(module: Any, args: Any, out: Any, i: int = i) -> None:
            state["phase"] = i + 1

        hooks.append(block.register_forward_pre_hook(pre, with_kwargs=True))
        hooks.append(block.register_forward_hook(post))
    for spec in info.linears:
        layer = base.get_submodule(spec.name)

        def lin_pre(module: Any, args: tuple[torch.Tensor, ...], name: str = spec.name) -> None:
            input_bytes[name] = args[0].untyped_storage().nbytes()
            input_key[name] = _storage_key(args[0])

        hooks.append(layer.register_forward_pre_hook(lin_pre))
        lora_a, lora_b = next(iter(layer.lora_A.values())), next(iter(layer.lora_B.values()))  # ModuleDicts
        for adapter in (lora_a, lora_b):
            hooks.append(adapter.register_forward_pre_hook(enter))
            hooks.append(adapter.register_forward_hook(leave))

        def a_pre(module: Any, args: Any, name: str = spec.name) -> None:
            state["in_a"] = name

        def a_post(module: Any, args: Any, out: Any) -> None:
            state["in_a"] = None

        hooks.append(lora_a.register_forward_pre_hook(a_pre))
        hooks.append(lora_a.register_forward_hook(a_post))
    try:
        with _unpacked_sequences(), mode, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            ids = torch.zeros(batch, seq_len, dtype=torch.long)
            out = model(input_ids=ids, labels=ids, use_cache=False)
        del out
    finally:
        for h in hooks:
            h.remove()
    n = len(blocks)
    blocks_saved = [0] * n
    pre_saved = head_saved = 0
    base_keys = set()
    for k, (nbytes, ph, by_base) in saved.items():
        if not by_base:
            continue
        base_keys.add(k)
        if ph < 0:
            pre_saved += nbytes
        elif ph >= n:
            head_saved += nbytes
        else:
            blocks_saved[ph] += nbytes
    trace = ActivationTrace(
        blocks_saved=tuple(blocks_saved),
        head_saved=head_saved,
        pre_saved=pre_saved,
        block_input=block_input[0] if block_input else batch * seq_len * info.hidden_size * _elem(dtype),
        input_bytes=input_bytes,
        input_key=input_key,
        input_saved={name: k in base_keys for name, k in input_key.items()},
        lora_saved={name: tuple(v.items()) for name, v in lora_saved.items()},
        base_keys=frozenset(base_keys),
        logits_elems=batch * seq_len * info.vocab_size,
    )
    _TRACES[key] = trace
    return trace


def _unpacked_sequences() -> Any:
    """Tell transformers the batch is not packed, as it finds itself for real data.

    With fake tensors it cannot look at position ids, so it would assume packing and build a dense
    mask, which changes the SDPA path (no GQA, a saved mask) from what training really runs.
    """
    import contextlib
    from unittest import mock

    import transformers.masking_utils as masking

    if not hasattr(masking, "find_packed_sequence_indices"):
        return contextlib.nullcontext()
    return mock.patch.object(masking, "find_packed_sequence_indices", lambda position_ids: None)


def _meta_model(info: ModelInfo, dtype: torch.dtype) -> torch.nn.Module:
    config = copy.deepcopy(info.config)
    # SDPA is what training uses on CPU and GPU; the eager path would save the seq x seq attention matrix.
    if getattr(config, "_attn_implementation", None) in (None, "eager") and hasattr(config, "_attn_implementation"):
        config._attn_implementation = "sdpa"
    return meta_model_from_config(config, dtype)


def _to_fake_cpu(model: torch.nn.Module, mode: Any) -> None:
    """Swap every meta parameter/buffer for a fake CPU tensor: CPU kernels get chosen, nothing is allocated."""
    with mode:
        for module in model.modules():
            for name, p in list(module._parameters.items()):
                if p is not None:
                    fake = torch.empty_strided(p.shape, p.stride(), dtype=p.dtype, device="cpu")
                    module._parameters[name] = torch.nn.Parameter(fake, requires_grad=p.requires_grad)
            for name, b in list(module._buffers.items()):
                if b is not None:
                    module._buffers[name] = torch.empty_strided(b.shape, b.stride(), dtype=b.dtype, device="cpu")


# ---------------------------------------------------------------- breakdown
@dataclass
class MemoryBreakdown:
    """Predicted training memory in bytes, part by part.

    ``total`` is the predicted peak, not the sum of the parts: LoRA gradients only appear once the backward
    reaches the adapters, after the logits buffers are gone; ``peak_phase`` says which moment peaks
    (``loss``, ``recompute`` under gradient checkpointing, or ``optimizer``). ``activations`` is what is
    held after the forward; ``recompute`` is one block rebuilt during a checkpointed backward.
    """

    quantized_weights: int
    unquantized_weights: int
    lora_params: int
    lora_grads: int
    optimizer_states: int
    activations: int
    logits_loss: int
    total: int
    recompute: int = 0
    peak_phase: str = "loss"
    quantized_by_backend: dict[str, int] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def weights(self) -> int:
        """Weight-only bytes (what the papers' budgets count): quantized + unquantized + LoRA."""
        return self.quantized_weights + self.unquantized_weights + self.lora_params

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["weights"] = self.weights
        return data


@dataclass(frozen=True)
class _ModuleCost:
    base: int  # base layer bytes
    is_quantized: bool
    lora: int  # LoRA parameter elements
    optim: int  # optimizer bytes
    act_extra: int  # activation bytes this module adds besides its (shared) input
    saves_input: bool  # whether the module makes autograd keep its input


_COSTS: dict[tuple[Any, ...], _ModuleCost] = {}


def _module_cost(
    spec: LinearSpec, mp: ModulePlan, trace: ActivationTrace | None, tokens: int, optimizer: str, dtype: torch.dtype
) -> _ModuleCost:
    key = (spec, mp, tokens, optimizer, dtype, trace is None)
    cost = _COSTS.get(key)
    if cost is not None:
        return cost
    quantized = mp.bits < 16
    base = base_module_bytes(spec, mp, dtype)
    lora = lora_numel(spec, mp.rank)
    optim = _optimizer_bytes(optimizer, [(mp.rank, spec.in_features), (spec.out_features, mp.rank)]) if mp.rank else 0
    extra = 0
    saves_input = False
    if mp.rank > 0:
        extra += tokens * mp.rank * _elem(LORA_DTYPE)  # lora_A output, saved by lora_B
    if quantized and (mp.backend == "hqq" or mp.bits == 8):
        # HQQLinear trains through HQQMatmulNoCacheMul and bnb int8 through MatMul8bitFp (CPU): both keep
        # their input, not a dequantized weight (shared with the LoRA's saved input unless dtypes differ)
        saves_input = True
    cost = _ModuleCost(base, quantized, lora, optim, extra, saves_input)
    _COSTS[key] = cost
    return cost


def estimate(
    info: ModelInfo,
    plan: Plan,
    *,
    batch: int,
    seq_len: int,
    optimizer: str = "adamw_torch",
    grad_checkpointing: bool = False,
    compute_dtype: torch.dtype | None = None,
) -> MemoryBreakdown:
    """Predict every part of the training memory of ``plan`` on ``info``'s model.

    ``compute_dtype`` is the dtype the model is loaded and trained in (default: ``info.dtype``, which is
    float32 unless the model section says otherwise).
    """
    compute_dtype = compute_dtype or info.dtype
    if batch < 1 or seq_len < 1:
        raise QRAError(f"batch and seq_len must be >= 1 (got {batch}, {seq_len})")
    if plan.fingerprint != info.fingerprint:
        raise QRAError(f"plan is for {plan.fingerprint.describe()}, not for this model ({info.fingerprint.describe()})")
    trace = trace_activations(info, batch, seq_len, compute_dtype)
    return _estimate(info, plan, trace, batch * seq_len, optimizer, grad_checkpointing, compute_dtype)


def _estimate(
    info: ModelInfo,
    plan: Plan,
    trace: ActivationTrace | None,
    tokens: int,
    optimizer: str,
    grad_checkpointing: bool,
    dtype: torch.dtype,
) -> MemoryBreakdown:
    quantized = unquantized = lora = optim = 0
    by_backend: dict[str, int] = {}
    block_extra = [0] * info.n_blocks
    block_inputs: list[dict[int, int]] = [{} for _ in range(info.n_blocks)]
    for spec in info.linears:
        mp = plan.modules.get(spec.name)
        if mp is None:
            mp = ModulePlan(bits=16, rank=0)
        cost = _module_cost(spec, mp, trace, tokens, optimizer, dtype)
        if cost.is_quantized:
            quantized += cost.base
            tag = f"{mp.backend}{mp.bits}"
            by_backend[tag] = by_backend.get(tag, 0) + cost.base
        else:
            unquantized += cost.base
        lora += cost.lora
        optim += cost.optim
        if trace is not None:
            block_extra[spec.block] += cost.act_extra
            if mp.rank > 0:
                # what lora_A saves: the module input (shared by sibling adapters) or, when the base dtype
                # differs from the adapters', the module's own cast copy
                for key, nbytes in trace.lora_saved[spec.name]:
                    if key not in trace.base_keys:
                        block_inputs[spec.block][key] = nbytes
            if cost.saves_input and not trace.input_saved[spec.name]:
                block_inputs[spec.block][trace.input_key[spec.name]] = trace.input_bytes[spec.name]
    unquantized += info.other_bytes(dtype)
    lora_bytes = lora * _elem(LORA_DTYPE)
    activations = logits = recompute = 0
    if trace is not None:
        per_block = [
            trace.blocks_saved[i] + block_extra[i] + sum(block_inputs[i].values()) for i in range(info.n_blocks)
        ]
        if grad_checkpointing:
            # every block keeps only its input; backward recomputes one block at a time
            activations = trace.pre_saved + info.n_blocks * trace.block_input
            recompute = max(per_block)
        else:
            activations = trace.pre_saved + sum(per_block)
        # loss backward: saved fp32 log-softmax + its incoming grad + the grad it produces
        logits = trace.head_saved + 2 * trace.logits_elems * 4
    static = quantized + unquantized + lora_bytes + optim
    # Peak = the largest of the moments that follow each other in a step (gradients are None until the
    # backward reaches the adapters, by then the logits buffers are freed):
    phases = {
        "loss": activations + logits,  # end of forward / start of backward
        "recompute": activations + recompute + lora_bytes,  # gradient checkpointing: one block rebuilt
        "optimizer": lora_bytes,  # all gradients, activations freed
    }
    phase = max(phases, key=lambda k: phases[k])
    total = static + phases[phase]
    return MemoryBreakdown(
        quantized_weights=quantized,
        unquantized_weights=unquantized,
        lora_params=lora_bytes,
        lora_grads=lora_bytes,
        optimizer_states=optim,
        activations=activations,
        logits_loss=logits,
        total=total,
        recompute=recompute,
        peak_phase=phase,
        quantized_by_backend=by_backend,
        settings={
            "optimizer": optimizer,
            "grad_checkpointing": grad_checkpointing,
            "compute_dtype": str(dtype).removeprefix("torch."),
        },
    )


# ---------------------------------------------------------------- budgets


def plan_bytes(info: ModelInfo, plan: Plan, train: Any, kind: str = "peak") -> int:
    """The number a budget is compared with: predicted peak total, or weights only (quantized +
    unquantized + LoRA params). ``train`` is a ``planner.config.TrainSection``. Fast after the first call
    for a given (model, batch, seq_len): per-module costs and the activation trace are cached."""
    dtype = info.dtype
    if kind == "weights":
        return _estimate(info, plan, None, 0, train.optimizer, False, dtype).weights
    if kind != "peak":
        raise QRAError(f"budget kind must be 'peak' or 'weights', not {kind!r}")
    trace = trace_activations(info, train.batch, train.seq_len, dtype)
    tokens = train.batch * train.seq_len
    return _estimate(info, plan, trace, tokens, train.optimizer, train.grad_checkpointing, dtype).total


def uniform_plan(info: ModelInfo, bits: int, rank: int, backend: str = "hqq") -> Plan:
    """Every block at (bits, rank): the reference of relative budgets."""
    return Plan.from_block_pairs(info.fingerprint, info.linears, [(bits, rank)] * info.n_blocks, backend)


def min_plan_bytes(
    info: ModelInfo,
    train: Any,
    bits_choices: Sequence[int],
    rank_choices: Sequence[int],
    backend: str = "hqq",
    kind: str = "peak",
) -> int:
    """Bytes of the cheapest block plan in the space. Block costs are independent (the base activations
    are shared), so the cheapest plan takes the cheapest (bits, rank) in every block: the cheapest
    uniform plan, because all blocks price a pair the same way up to their shapes."""
    if not bits_choices or not rank_choices:
        raise QRAError("the search space needs at least one bit-width and one rank")
    best: int | None = None
    for bits in bits_choices:
        for rank in rank_choices:
            cost = plan_bytes(info, uniform_plan(info, bits, rank, backend), train, kind)
            best = cost if best is None else min(best, cost)
    assert best is not None
    return best


_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}
_UNITS.update({"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40})
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([a-z]*)\s*$", re.IGNORECASE)
_UNIFORM = re.compile(r"^uniform:(\d+)(?:bit)?(?:-(hqq|bnb))?:r(\d+)$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """``"22GiB"``, ``"1.5 GB"``, ``"123456"`` -> bytes."""
    m = _SIZE.match(text)
    if not m or m.group(2).lower() not in _UNITS:
        raise QRAError(f"not a memory size: {text!r} (use e.g. 22GiB, 800MiB, 1.5GB or plain bytes)")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


@dataclass(frozen=True)
class Budget:
    """A memory budget: absolute bytes, or relative to a uniform plan; of peak or weight-only memory."""

    kind: str  # "peak" or "weights"
    bytes: int | None = None  # absolute budgets
    uniform: tuple[int, int, str] | None = None  # (bits, rank, backend) of a relative budget
    text: str = ""

    @classmethod
    def parse(cls, text: str | int) -> Budget:
        """``"22GiB"``, ``12345``, ``"uniform:4bit:r16"``, ``"uniform:4bit-bnb:r16"``, ``"weights:..."``."""
        if isinstance(text, int):
            if text <= 0:
                raise QRAError(f"a memory budget must be positive, got {text}")
            return cls(kind="peak", bytes=text, text=str(text))
        raw = str(text).strip()
        kind, body = "peak", raw
        for prefix in ("weights:", "peak:"):
            if raw.lower().startswith(prefix):
                kind, body = prefix[:-1], raw[len(prefix) :].strip()
        m = _UNIFORM.match(body)
        if m:
            bits, backend, rank = int(m.group(1)), (m.group(2) or "hqq").lower(), int(m.group(3))
            if bits not in (2, 3, 4, 8, 16):
                raise QRAError(f"budget {raw!r}: bits must be one of 2, 3, 4, 8, 16")
            if backend == "bnb" and bits not in (4, 8, 16):
                raise QRAError(f"budget {raw!r}: bitsandbytes stores only 4 or 8 bits")
            return cls(kind=kind, uniform=(bits, rank, backend), text=raw)
        if body.lower().startswith("uniform"):
            raise QRAError(f"bad relative budget {raw!r} (use e.g. uniform:4bit:r16 or uniform:4bit-bnb:r16)")
        size = parse_size(body)
        if size <= 0:
            raise QRAError(f"a memory budget must be positive, got {raw!r}")
        return cls(kind=kind, bytes=size, text=raw)

    def resolve(self, info: ModelInfo, train: Any) -> int:
        """Bytes this budget allows for ``info``'s model under ``train`` (a TrainSection)."""
        if self.bytes is not None:
            return self.bytes
        assert self.uniform is not None
        bits, rank, backend = self.uniform
        return plan_bytes(info, uniform_plan(info, bits, rank, backend), train, self.kind)

    def check_feasible(
        self,
        info: ModelInfo,
        train: Any,
        bits_choices: Sequence[int],
        rank_choices: Sequence[int],
        backend: str = "hqq",
    ) -> int:
        """Resolve the budget; raise QRAError naming the minimum if even the cheapest plan exceeds it."""
        limit = self.resolve(info, train)
        minimum = min_plan_bytes(info, train, bits_choices, rank_choices, backend, self.kind)
        if minimum > limit:
            what = "peak training memory" if self.kind == "peak" else "weight memory"
            raise QRAError(
                f"budget {self.text or limit} = {format_bytes(limit)} is below the cheapest plan's {what} "
                f"{format_bytes(minimum)} ({minimum} bytes); raise the budget or widen the search space"
            )
        return limit


def format_bytes(n: int) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"
