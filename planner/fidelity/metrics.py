"""Task metric of a fidelity run, over the eval rows that carry an answer.

Rows with a closed set of ``choices`` are scored like lm-eval's multiple-choice tasks: the choice with the
highest log-likelihood after the prompt is the model's answer (exact, and meaningful for a small model that
does not yet answer in one word). Free-text rows are greedily decoded and must match after normalising
case, whitespace and surrounding punctuation.
"""

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


def _prompt_text(tokenizer: Any, prompt: str) -> str:
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
        )
    return prompt + "\n"


@torch.no_grad()
def _choice_correct(model: torch.nn.Module, tokenizer: Any, e: Example) -> bool:
    """argmax over ``e.choices`` of log p(prompt + choice) beyond their shared prefix equals the answer.

    Each choice is tokenized together with the prompt (as in training: a tokenizer may merge across the
    boundary); the longest token prefix all of them share runs once, its KV cache is repeated, and the rest
    of every choice runs as one right-padded batch.
    """
    device = next(model.parameters()).device
    text = _prompt_text(tokenizer, e.prompt)
    joint = [tokenizer(text + c, add_special_tokens=False).input_ids for c in e.choices]
    shared = 0
    while shared < min(map(len, joint)) - 1 and len({j[shared] for j in joint}) == 1:
        shared += 1
    first = model(input_ids=torch.tensor([joint[0][:shared]], device=device), use_cache=True)
    first_logp = torch.log_softmax(first.logits[0, -1].float(), -1)  # predicts every choice's first own token
    cache = first.past_key_values
    cache.batch_repeat_interleave(len(joint))
    rests = [j[shared:] for j in joint]
    longest = max(map(len, rests))
    ids = torch.zeros((len(rests), longest), dtype=torch.long)
    mask = torch.zeros((len(rests), shared + longest), dtype=torch.long)
    mask[:, :shared] = 1
    for i, r in enumerate(rests):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, shared : shared + len(r)] = 1
    positions = torch.arange(shared, shared + longest).expand(len(rests), -1)
    out = model(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=positions.to(device),
                past_key_values=cache, use_cache=True)  # fmt: skip
    logp = torch.log_softmax(out.logits.float(), -1)  # position j predicts token j + 1
    # mean log-probability per token (length-normalised like lm-eval's acc_norm): 1-5 token choices compete fairly
    scores = [
        float(first_logp[r[0]] + sum(logp[i, j - 1, t] for j, t in enumerate(r) if j)) / len(r)
        for i, r in enumerate(rests)
    ]
    return e.choices[max(range(len(rests)), key=scores.__getitem__)] == e.answer


@torch.no_grad()
def answer_accuracy(model: torch.nn.Module, tokenizer: Any, items: tuple[Example, ...]) -> float | None:
    """The fraction of rows with an ``answer`` answered correctly (None: no row has one)."""
    with_answers = [e for e in items if e.answer is not None]
    if not with_answers:
        return None
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    hits = 0
    for e in with_answers:
        if e.choices:
            hits += _choice_correct(model, tokenizer, e)
            continue
        text = _prompt_text(tokenizer, e.prompt)
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
