"""The loss part of a step's memory: what the loss the trainer runs (``train.loss_path``) holds at its peak —
transformers' full-logits loss, TRL's chunked NLL, Liger's fused linear cross-entropy, cut cross-entropy."""

from __future__ import annotations

import torch

from planner.memory.activations import ActivationTrace
from planner.memory.weights import elem
from planner.model_info import ModelInfo
from qra_plugin.errors import QRAError

#: TRL 1.9 ``sft_trainer._CHUNKED_LM_HEAD_CHUNK_SIZE``: valid tokens per chunk of its chunked NLL
TRL_CHUNK_TOKENS = 256


def loss_buffers(info: ModelInfo, trace: ActivationTrace, loss_path: str, dtype: torch.dtype) -> int:
    """Bytes the loss adds at its peak (start of the backward) besides the blocks' activations, for the
    loss the trainer runs. Every path keeps the final norm's saved tensors (``head_saved - loss_saved``).

    - ``hf_full`` (transformers' model loss): the traced fp32 log-softmax of the full logits, then its
      backward's incoming grad and produced grad (two more fp32 ``tokens x vocab``).
    - ``trl_chunked`` (TRL 1.9 ``_chunked_cross_entropy_loss``): the shifted hidden states gathered into
      one copy (+ int64 order and labels), and one checkpointed chunk of ``TRL_CHUNK_TOKENS`` tokens rebuilt
      in the backward: four fp32 ``chunk x vocab`` buffers (logits, log-softmax, its exp, a gradient) and,
      below fp32, what its upcast adds (``_chunk_upcast``).
    - ``liger`` (fused linear cross-entropy): a shifted copy of the hidden states, the hidden-sized input
      gradient it computes in the forward and one logits chunk of ~hidden x tokens elements (its own rule).
    - ``cce`` (cut cross-entropy): the input gradient and an fp32 log-sum-exp per token; no logits.
    Liger and cce are priced from their kernels' allocations (CUDA only: not measured here).
    """
    norm_part = trace.head_saved - trace.loss_saved
    hidden, vocab, e = info.hidden_size, info.vocab_size, elem(dtype)
    tokens = trace.tokens - trace.batch  # positions with a next-token label: each row loses its last one
    if loss_path == "hf_full":
        return trace.head_saved + 2 * trace.logits_elems * 4
    if loss_path == "trl_chunked":
        chunk = min(TRL_CHUNK_TOKENS, tokens)
        return (
            norm_part
            + tokens * (hidden * e + 16)
            + 4 * chunk * vocab * 4
            + _chunk_upcast(tokens, chunk, hidden, vocab, e)
        )
    if loss_path == "liger":
        chunk = _next_pow2(-(-tokens // -(-vocab // hidden)))
        return norm_part + 2 * tokens * hidden * e + chunk * vocab * e + 8 * tokens
    if loss_path == "cce":
        return norm_part + tokens * hidden * e + 4 * tokens
    raise QRAError(f"unknown loss path {loss_path!r}")


def _chunk_upcast(tokens: int, chunk: int, hidden: int, vocab: int, e: int) -> int:
    """What TRL's chunk (``h.float() @ w.float().t()``) adds below fp32, at the peak of its backward: the fp32
    copy of the output weight the recomputed matmul saves for the input gradient and, with several chunks,
    the gradient of the gathered hidden states they accumulate into (the chunk's own fp32 copy is gone by then).
    Fitted to the allocator-level peak of ``_chunked_cross_entropy_loss`` on CPU in bf16 (vocab 512-49152,
    hidden 256/576, 254 and 1020 tokens: within 22 KB). fp32 keeps its earlier, separately measured rule."""
    if e == 4:
        return 0
    return vocab * hidden * 4 + (tokens * hidden * e if tokens > chunk else 0)


def _next_pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()
