"""Optimizer state bytes, by Hugging Face ``optim`` name, as each library really lays its state out.

One class per state layout, registered under the ``TrainingArguments.optim`` names that build it
(``transformers/trainer_optimizer.py`` maps names to classes and kwargs; Axolotl passes these names
through unchanged). Each prices the tensors one ``optimizer.step()`` leaves in ``optimizer.state`` for
a trainable tensor of a given shape and dtype, counted once per storage (``tensor_bytes``), plus what
one optimizer holds once whatever its number of parameters (``shared_bytes``). ``tests/test_optimizers.py``
builds every optimizer through HF's own mapping, steps it on CPU on LoRA tensors and compares the bytes
of its real state with these numbers (equal to the byte).
"""

from __future__ import annotations

import math
import os
import shutil
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from qra_plugin.errors import QRAError

Shape = tuple[int, ...]

#: bitsandbytes keeps 32-bit states for tensors below this size (``min_8bit_size``; HF leaves the default)
BNB_MIN_8BIT_SIZE = 4096
#: bitsandbytes' blockwise 8-bit update quantizes its states in blocks of this many elements (fixed in source)
BNB_BLOCK = 256
#: torchao's low-bit AdamW keeps plain states unless a tensor has >= 4096 elements divisible by the block
TORCHAO_MIN_SIZE = 4096
#: HF passes ``block_size=256`` to torchao's AdamW4bit and AdamW8bit alike (``optim_args`` may override it)
TORCHAO_HF_BLOCK = 256


@dataclass(frozen=True)
class OptimizerStates:
    """How one optimizer family stores its state (``names``: the HF ``optim`` names that build ``builds``)."""

    names: tuple[str, ...]
    builds: str

    def tensor_bytes(self, shape: Shape, elem: int) -> int:
        """State bytes for one trainable tensor of ``shape`` whose elements take ``elem`` bytes."""
        raise NotImplementedError

    def shared_bytes(self, numels: Iterable[int]) -> int:
        """Bytes held once per optimizer (0 unless a family shares a buffer between its parameters)."""
        return 0

    def cpu_problem(self) -> str | None:
        """Why this optimizer cannot step on this machine's CPU (None: it can)."""
        return None


@dataclass(frozen=True)
class TorchAdamW(OptimizerStates):
    """``torch.optim.AdamW`` (``torch/optim/adam.py`` ``_init_group``): ``exp_avg`` and ``exp_avg_sq`` shaped and
    typed like the parameter, and a 0-dim float32 ``step`` tensor (fused or not; float64 only when torch's
    default dtype is float64)."""

    def tensor_bytes(self, shape: Shape, elem: int) -> int:
        return 2 * math.prod(shape) * elem + 4


@dataclass(frozen=True)
class HFAdafactor(OptimizerStates):
    """``transformers.optimization.Adafactor`` as HF's Trainer builds it (``beta1=None``, ``relative_step=False``):
    a factored second moment for tensors of 2+ dims (``exp_avg_sq_row`` over all dims but the last,
    ``exp_avg_sq_col`` over all but the second-to-last), a full one for 1-D tensors, and a 0-dim ``RMS``
    tensor in the parameter's float32 copy; ``step`` is a Python int."""

    def tensor_bytes(self, shape: Shape, elem: int) -> int:
        if len(shape) < 2:
            return math.prod(shape) * elem + 4
        rows = math.prod(shape[:-1])
        cols = math.prod(shape[:-2]) * shape[-1]
        return (rows + cols) * elem + 4


@dataclass(frozen=True)
class TorchSGD(OptimizerStates):
    """``torch.optim.SGD`` (``torch/optim/sgd.py``) with HF's default ``momentum=0``: no state at all."""

    def tensor_bytes(self, shape: Shape, elem: int) -> int:
        return 0


@dataclass(frozen=True)
class BnbAdamW(OptimizerStates):
    """``bitsandbytes.optim.AdamW`` (0.50, ``bitsandbytes/optim/optimizer.py`` ``Optimizer2State.init_state``),
    built by HF with ``optim_bits`` 8 when the name says ``8bit`` (else 32) and ``is_paged`` when it says
    ``paged``. 8-bit: ``state1``/``state2`` uint8 per element + ``absmax1``/``absmax2`` float32 per block of
    256 (the last block partial); tensors below ``min_8bit_size`` (4096) keep two float32 states, as 32-bit
    mode does. ``qmap1``/``qmap2`` (256 float32 each) are the optimizer's one ``name2qmap`` pair, the same
    tensors in every parameter's state: held once. ``step`` is a Python int. Paged states take the same
    bytes; on CUDA those of tensors with >= 1e5 elements live in managed memory (``F.get_paged``), outside
    PyTorch's allocator and so outside ``torch.cuda.max_memory_allocated``; on CPU ``get_state_buffer``
    falls back to ordinary tensors."""

    bits: int = 8

    def _is_8bit(self, numel: int) -> bool:
        return self.bits == 8 and numel >= BNB_MIN_8BIT_SIZE

    def tensor_bytes(self, shape: Shape, elem: int) -> int:
        numel = math.prod(shape)
        if not self._is_8bit(numel):
            return 2 * numel * 4
        return 2 * numel + 2 * math.ceil(numel / BNB_BLOCK) * 4

    def shared_bytes(self, numels: Iterable[int]) -> int:
        return 2 * 256 * 4 if any(self._is_8bit(n) for n in numels) else 0


@dataclass(frozen=True)
class TorchaoAdamW(OptimizerStates):
    """torchao's ``AdamW8bit`` / ``AdamW4bit`` (0.17, ``torchao/optim/adam.py`` ``_new_buffer`` and
    ``subclass_8bit.py`` / ``subclass_4bit.py`` ``zeros``), built by HF with ``block_size=256`` for both.
    A tensor with >= 4096 elements divisible by the block gets two quantized states, each: ``codes`` uint8
    (one per element at 8 bits, two elements per byte at 4 bits), a float32 ``scale`` per block, and its
    own float32 ``qmap`` (256 entries at 8 bits, 16 at 4 bits; a new tensor per state); other tensors get
    two plain states like the parameter. Plus a 0-dim float32 ``step``. The update runs under
    ``torch.compile`` (on CPU: Inductor with a C++ compiler; the first step of each shape compiles)."""

    bits: int = 8
    block: int = TORCHAO_HF_BLOCK

    def tensor_bytes(self, shape: Shape, elem: int) -> int:
        numel = math.prod(shape)
        if numel < TORCHAO_MIN_SIZE or numel % self.block:
            return 2 * numel * elem + 4
        codes = numel * self.bits // 8
        qmap = 2**self.bits * 4
        return 2 * (codes + numel // self.block * 4 + qmap) + 4

    def cpu_problem(self) -> str | None:

        compilers = [os.environ.get("CXX") or "", "g++", "c++", "clang++"]
        if not any(c and shutil.which(c) for c in compilers):
            return f"{self.builds} steps under torch.compile, which needs a C++ compiler on CPU (none found)"
        return None


_FAMILIES: tuple[OptimizerStates, ...] = (
    TorchAdamW(("adamw_torch", "adamw_torch_fused"), "torch.optim.AdamW"),
    HFAdafactor(("adafactor",), "transformers.optimization.Adafactor"),
    TorchSGD(("sgd",), "torch.optim.SGD"),
    BnbAdamW(("adamw_bnb_8bit", "adamw_8bit", "paged_adamw_8bit"), "bitsandbytes.optim.AdamW (8-bit)", bits=8),
    BnbAdamW(("paged_adamw_32bit",), "bitsandbytes.optim.AdamW (32-bit, paged)", bits=32),
    TorchaoAdamW(("adamw_torch_8bit",), "torchao.optim.AdamW8bit", bits=8),
    TorchaoAdamW(("adamw_torch_4bit",), "torchao.optim.AdamW4bit", bits=4),
)

#: every supported HF ``optim`` name -> its state layout
OPTIMIZER_STATES: dict[str, OptimizerStates] = {name: fam for fam in _FAMILIES for name in fam.names}
#: the supported names, in the order above
OPTIMIZERS: tuple[str, ...] = tuple(OPTIMIZER_STATES)


def optimizer_states(optimizer: str) -> OptimizerStates:
    """The layout of ``optimizer``; one line listing the supported names when qra does not price it."""
    try:
        return OPTIMIZER_STATES[optimizer]
    except KeyError:
        raise QRAError(f"unknown optimizer {optimizer!r} (supported: {', '.join(OPTIMIZERS)})") from None


def check_optimizer(optimizer: str) -> str:
    """``optimizer`` if qra prices it (a pydantic validator's helper); ValueError with the supported list."""
    if optimizer not in OPTIMIZER_STATES:
        raise ValueError(f"unknown optimizer {optimizer!r} (supported: {', '.join(OPTIMIZERS)})")
    return optimizer


def optimizer_tensor_bytes(optimizer: str, shapes: Iterable[Shape], elem: int = 4) -> int:
    """State bytes of ``shapes`` (trainable tensors of ``elem``-byte elements), without the shared part."""
    states = optimizer_states(optimizer)
    return sum(states.tensor_bytes(tuple(shape), elem) for shape in shapes)


def optimizer_bytes(optimizer: str, shapes: Sequence[Shape], elem: int = 4) -> int:
    """Everything one optimizer over ``shapes`` holds: per-tensor states + its shared buffers (once)."""
    states = optimizer_states(optimizer)
    return optimizer_tensor_bytes(optimizer, shapes, elem) + states.shared_bytes(math.prod(s) for s in shapes)


def fidelity_refusal(optimizer: str) -> str | None:
    """The one line refusing fidelity runs with ``optimizer`` on this machine (None: it can step here).

    Fidelity runs train with the user's own optimizer; where it cannot run, qra says so rather than
    score candidates with another one."""
    import torch

    if torch.cuda.is_available():
        return None
    problem = optimizer_states(optimizer).cpu_problem()
    return f"optimizer {optimizer}: fidelity runs train on this CPU, but {problem}" if problem else None
