"""Task metric of a fidelity run: exact-match accuracy of greedy answers to prompts that carry one."""

from __future__ import annotations

from typing import Any

import torch

from planner.data.sources import Example


def _norm(text: str) -> str:
    return " ".join(text.lower().split()).strip(" .,:;!?\"'")


def answer_matches(generated: str, answer: str) -> bool:
    """Exact match after normalising case, whitespace and surrounding punctuation; the answer may be
    followed by more text (a short model reply often explains after the answer)."""
    gen, ans = _norm(generated), _norm(answer)
    return bool(ans) and (gen == ans or gen.startswith(ans + " ") or gen.startswith(ans + "."))


@torch.no_grad()
def answer_accuracy(model: torch.nn.Module, tokenizer: Any, items: tuple[Example, ...]) -> float | None:
    """Greedy-decode each prompt that has an ``answer``; the fraction answered correctly (None: no answers)."""
    with_answers = [e for e in items if e.answer is not None]
    if not with_answers:
        return None
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    hits = 0
    for e in with_answers:
        if getattr(tokenizer, "chat_template", None):
            text = tokenizer.apply_chat_template(
                [{"role": "user", "content": e.prompt}], add_generation_prompt=True, tokenize=False
            )
        else:
            text = e.prompt + "\n"
        ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids.to(device)
        budget = len(tokenizer(e.answer, add_special_tokens=False).input_ids) + 4
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=budget,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )
        hits += answer_matches(tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True), e.answer)
    model.train(was_training)
    return hits / len(with_answers)
