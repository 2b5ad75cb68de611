"""Sampling responses from a policy, the rows PPO trains on, GAE, and judging a policy against its reference.

A response is what the policy writes after :func:`tuneforge.data.rankings.prompt_ids`: ``bos prompt ␣`` for a text
prompt, until it writes a newline or ``eos``; the chat template's generation prompt for a conversation (a list of
messages), until it writes ``eos`` (the template's end-of-turn token, e.g. SmolLM2's ``<|im_end|>``; an answer
may hold newlines). The stop token belongs to the response (the policy learns when to stop); a response that runs
out of ``max_new_tokens`` has none. Generation runs on left-padded prompts with the KV cache; training rows are
the same tokens laid out again right-padded (prompt ids, then response ids), where causal attention needs no mask.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import torch

from tuneforge.data.batching import pad_right
from tuneforge.errors import ConfigError
from tuneforge.rlhf.policy import model_logprobs, response_mask
from tuneforge.data.rankings import prompt_ids
from tuneforge.data.world import hidden_judge, judge_of

__all__ = ["Samples", "sample", "continue_ids", "masked_mean", "whiten", "gae", "judge_for", "compare", "whole_words"]

Prompt = str | list[dict]  # text, or a conversation: [{"role", "content"}, ...] ending with a user turn

NEWLINE = ord("\n")


@dataclasses.dataclass
class Samples:
    """Responses to ``prompts`` and the right-padded rows that hold them."""

    prompts: list[Prompt]
    texts: list[str]  # each response without its stop token, decoded
    input: torch.Tensor  # (B, T) prompt ids, response [stop], right-padded
    start: torch.Tensor  # (B,) index of the first response token
    last: torch.Tensor  # (B,) index of the last response token (its stop token, when it stopped)
    stopped: torch.Tensor  # (B,) bool: the response ended with a stop token, not by running out of tokens

    @property
    def mask(self) -> torch.Tensor:
        """(B, T-1) response tokens in the shifted frame of :func:`tuneforge.rlhf.policy.token_logprobs`."""
        return response_mask(self.input, self.start, self.last)

    @property
    def lengths(self) -> torch.Tensor:
        return self.last - self.start + 1


def sample(generate: Callable, tokenizer, prompts: Sequence[Prompt], *, max_new_tokens: int,
           temperature: float = 1.0, top_k: int | None = None, generator: torch.Generator | None = None,
           device=None, per_prompt: int = 1) -> Samples:
    """``per_prompt`` responses to each prompt from ``generate`` (``model.generate`` or a reference's), with the KV
    cache: B * per_prompt rows, prompt-major (rows i * G .. i * G + G - 1 answer prompt i, and ``Samples.prompts``
    repeats each prompt G times). The G samples of a prompt share one prefill (``generate(num_samples=G)``). Text
    prompts stop at a newline or eos, conversations at eos only; a batch holding both generates each kind apart
    (the stop tokens are the batch's), in the order given."""
    tok, G = tokenizer, per_prompt
    kinds = [isinstance(p, str) for p in prompts]
    rows: list = [None] * (len(prompts) * G)  # (row ids, text, start, last, stopped) per sample
    for kind in dict.fromkeys(kinds):  # text first when it comes first: one call when the batch is of one kind
        at = [i for i, k in enumerate(kinds) if k == kind]
        stops = (NEWLINE, tok.eos_id) if kind else (tok.eos_id,)
        done = continue_ids(generate, tok, [prompt_ids(tok, prompts[i]) for i in at], stops,
                            max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, generator=generator,
                            device=device, per_prompt=G)
        for n, row in enumerate(done):  # the samples of prompt at[n // G]
            rows[at[n // G] * G + n % G] = row
    ids, texts, start, last, stopped = zip(*rows)
    return Samples([p for p in prompts for _ in range(G)], list(texts), pad_right(list(ids), tok.pad_id).to(device),
                   torch.tensor(start, device=device), torch.tensor(last, device=device),
                   torch.tensor(stopped, device=device))


def continue_ids(generate: Callable, tok, heads: list[list[int]], stops: Sequence[int], *, max_new_tokens: int,
                 temperature: float = 1.0, top_k: int | None = None, generator: torch.Generator | None = None,
                 device=None, per_prompt: int = 1) -> list[tuple]:
    """``per_prompt`` continuations of each token prompt in ``heads``, generated in one left-padded batch with the KV
    cache, each prompt encoded once for its samples: ``(row ids, text, start, last, stopped)`` per continuation,
    prompt-major (``len(heads) * per_prompt`` of them), the text decoded without its stop token (one of ``stops``).
    ``temperature=0`` is greedy."""
    if isinstance(per_prompt, bool) or not isinstance(per_prompt, int) or per_prompt < 1:
        raise ValueError(f"per_prompt must be a whole number >= 1 (responses per prompt), got {per_prompt!r}")
    width = max(len(h) for h in heads)
    left = torch.full((len(heads), width), tok.pad_id, dtype=torch.long)  # (B, Tp), left-padded
    mask = torch.zeros(len(heads), width, dtype=torch.bool)
    for i, h in enumerate(heads):
        left[i, width - len(h):] = torch.tensor(h)
        mask[i, width - len(h):] = True
    shared = {"num_samples": per_prompt} if per_prompt > 1 else {}  # a plain generate callable need not know it
    out = generate(left.to(device), max_new_tokens, temperature=temperature, top_k=top_k, eos_id=list(stops),
                   pad_id=tok.pad_id, key_padding_mask=mask.to(device), generator=generator, **shared)
    if out.size(0) != len(heads) * per_prompt:
        raise ValueError(f"generate returned {out.size(0)} rows for {len(heads)} prompts x {per_prompt} samples: "
                         "it must take num_samples= and return the samples prompt-major (as model.generate does)")
    new = out[:, width:].tolist()  # one host sync for the whole batch: (B * per_prompt) rows
    rows = []
    for h, gen in zip((h for h in heads for _ in range(per_prompt)), new):
        end = next((k for k, t in enumerate(gen) if t in stops), None)
        response = gen[:end + 1] if end is not None else [t for t in gen if t != tok.pad_id]
        text = tok.decode(response[:end] if end is not None else response)
        rows.append((h + response, text, len(h), len(h) + len(response) - 1, end is not None))
    return rows


def whole_words(samples: Samples) -> list[str]:
    """The responses' texts without the word a response that ran out of ``max_new_tokens`` was cut in: what a
    measure of the words a policy writes (:func:`tuneforge.data.world.in_vocabulary`) should read, as a cut word
    ("whil") is a fragment, not a misspelling."""
    return [t if stopped else t[:len(t) - len(t.split()[-1])] if t.split() else t
            for t, stopped in zip(samples.texts, samples.stopped.tolist())]


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)


def whiten(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Zero mean and unit variance over the masked entries (advantages, so one rollout's scale does not set the
    step size); masked-out entries become 0."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    return (x - mean) * torch.rsqrt(var + 1e-8) * mask


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, *, gamma: float = 1.0, lam: float = 0.95
        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over each row's response (Schulman et al., 2016).

    :param rewards: (B, L) reward of each action (token); :param values: (B, L) value of the state each action
        was taken in; :param mask: (B, L) the response's actions, one contiguous run per row. Past a row's last
        action the episode has ended: the next value is 0.
    :return: ``(advantages, returns)``, each (B, L), zero outside the mask; ``returns = advantages + values``.

    ``δ_t = r_t + γ V_{t+1} - V_t`` and ``A_t = δ_t + γ λ A_{t+1}``, computed backwards.
    """
    m = mask.to(rewards.dtype)
    adv = torch.zeros_like(rewards)
    next_value = torch.zeros_like(rewards[:, 0])  # (B,)
    next_adv = torch.zeros_like(rewards[:, 0])
    for t in range(rewards.size(1) - 1, -1, -1):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        a = delta + gamma * lam * next_adv
        adv[:, t] = a * m[:, t]
        # Outside the response the chain restarts: the action before the first one has no successor here.
        next_value = values[:, t] * m[:, t]
        next_adv = a * m[:, t]
    return adv, (adv + values) * m


Judge = Callable[[list[Prompt], list[str]], list[float]]


def judge_for(kind: str, data: str, reward: Judge | None = None, *, chat: bool = False) -> Judge | None:
    """What scores responses in evaluation, ``judge(prompts, responses) -> scores``: ``world`` (the embedded world's
    hidden preference), ``reward`` (``reward``, e.g. a reward model), ``auto`` (the hidden judge of the data when it
    has one, :func:`tuneforge.data.world.judge_of`, else ``reward`` when given), or ``none`` (None).

    ``chat``: some prompts are conversations. The world's judge reads a question, so it is then given each
    conversation's last user message (a reward model reads the whole conversation through the chat template)."""
    if kind == "auto":
        hidden = judge_of(data)
        if hidden is not None:
            return _on_last_question if chat else hidden
        kind = "reward" if reward is not None else "none"
    if kind == "world":
        return _on_last_question if chat else hidden_judge
    if kind == "reward":
        if reward is None:
            raise ConfigError("judge=reward needs a reward model (ppo:reward=RUN)")
        return reward
    return None


def _on_last_question(prompts: list[Prompt], responses: list[str]) -> list[float]:
    """The world's hidden preference of each response to its prompt's text: a conversation's last user message."""
    questions = [p if isinstance(p, str) else next(m["content"] for m in reversed(p) if m["role"] == "user")
                 for p in prompts]
    return hidden_judge(questions, responses)


@torch.no_grad()
def compare(policy, reference, tokenizer, prompts: Sequence[Prompt], *, judge: Judge,
            max_new_tokens: int, temperature: float = 1.0, seed: int = 0, batch_size: int = 64, device=None,
            fluency: Callable[[list[str]], float] | None = None) -> dict:
    """The policy against its reference on ``prompts``: each writes one response per prompt (sampled with the
    same seed, so identical policies write identical responses and tie), ``judge(prompts, responses)`` scores
    both, and the policy's samples measure the KL to the reference.

    Returns ``win_rate`` (policy better + half the ties), ``ties``, ``score`` / ``score_reference`` (mean
    judgement), ``kl_per_token`` (mean over the policy's response tokens of log π - log π_ref, the usual
    sampled estimate of KL(π ‖ π_ref)) and ``response_tokens`` (mean length). With ``fluency`` (texts -> a
    share, e.g. :func:`tuneforge.data.world.in_vocabulary`), also ``in_vocabulary`` and ``in_vocabulary_reference``:
    that share over each side's responses (:func:`whole_words`: a word cut by ``max_new_tokens`` not counted).
    """
    wins = ties = 0.0
    scores, ref_scores, kl_sum, tokens, n = [], [], 0.0, 0.0, 0
    texts: list[str] = []
    ref_texts: list[str] = []
    for b in range(0, len(prompts), batch_size):
        chunk = list(prompts[b:b + batch_size])
        mine = sample(policy.generate, tokenizer, chunk, max_new_tokens=max_new_tokens, temperature=temperature,
                      generator=torch.Generator(device=device).manual_seed(seed + b), device=device)
        theirs = sample(reference.generate, tokenizer, chunk, max_new_tokens=max_new_tokens, temperature=temperature,
                        generator=torch.Generator(device=device).manual_seed(seed + b), device=device)
        a, r = judge(chunk, mine.texts), judge(chunk, theirs.texts)
        wins += sum(x > y for x, y in zip(a, r))
        ties += sum(x == y for x, y in zip(a, r))
        scores += a
        ref_scores += r
        texts += whole_words(mine)
        ref_texts += whole_words(theirs)
        mask = mine.mask
        own = model_logprobs(policy, mine.input, temperature=temperature)
        ref = model_logprobs(reference, mine.input, temperature=temperature)
        kl_sum += float(((own - ref) * mask).sum())
        tokens += float(mask.sum())
        n += len(chunk)
    out = {"win_rate": (wins + 0.5 * ties) / n, "ties": ties / n, "score": sum(scores) / n,
           "score_reference": sum(ref_scores) / n, "kl_per_token": kl_sum / max(tokens, 1.0),
           "response_tokens": tokens / n}
    if fluency is not None:
        out.update(in_vocabulary=fluency(texts), in_vocabulary_reference=fluency(ref_texts))
    return out
