"""Prompt-lookup (n-gram) speculative decoding for the ``hf`` rollout: vLLM's ``method: ngram``.

A multi-turn agent repeats itself: tags and field names come back every turn, a scratch sentence reuses
the previous turn's words, an answer copies numbers from the feedback. The tokens that followed the
latest earlier occurrence of the last ``n`` tokens (``n`` from ``prompt_lookup_max`` down to
``prompt_lookup_min``) are proposed as a draft, and up to ``num_speculative_tokens`` of them are checked
in the next forward, which then emits every accepted draft token plus one. A CPU decode step streams all
the weights whether it runs 1 token or 5, so each accepted token saves most of a step.

Exact, token for token in distribution: a greedy row keeps a draft token iff it is the argmax, so its
tokens are those of plain decoding; a sampling row keeps draft token ``d`` with probability ``p(d)`` and,
at its first rejection, samples from ``p`` without ``d`` (renormalised): speculative sampling (Leviathan
et al., 2023; Chen et al., 2023) with a one-hot draft distribution, whose tokens have exactly the
distribution of the plain sampler (``p`` after temperature, top-k and top-p). Log-probs are read from the
same positions' logits as without speculation (up to float rounding of a multi-token forward).

Config: ``actor_rollout_ref.rollout.engine_kwargs.hf.speculative_config``, vLLM's keys:
``{method: ngram, num_speculative_tokens: 4, prompt_lookup_max: 3, prompt_lookup_min: 1}``; off when
absent. A batch with a repetition penalty decodes one token a step (the penalty of draft position j
depends on the drafts before it).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

SPECULATIVE_KEYS = ("method", "num_speculative_tokens", "prompt_lookup_max", "prompt_lookup_min")


@dataclass(frozen=True)
class NgramSpeculation:
    """Drafts from the sequence itself: what followed the latest earlier occurrence of its last n tokens.

    Attributes:
        num_tokens: most draft tokens checked per forward (vLLM's ``num_speculative_tokens``).
        lookup_max: longest suffix n-gram looked up (tried first).
        lookup_min: shortest suffix n-gram looked up.
    """

    num_tokens: int
    lookup_max: int = 3
    lookup_min: int = 1

    def __post_init__(self) -> None:
        if self.num_tokens < 1:
            raise ValueError(f"speculative_config.num_speculative_tokens must be >= 1, got {self.num_tokens}")
        if not 1 <= self.lookup_min <= self.lookup_max:
            raise ValueError(
                "speculative_config needs 1 <= prompt_lookup_min <= prompt_lookup_max, got "
                f"prompt_lookup_min={self.lookup_min}, prompt_lookup_max={self.lookup_max}"
            )

    @classmethod
    def from_options(cls, options: Mapping[str, Any] | None) -> NgramSpeculation | None:
        """Parse ``engine_kwargs.hf.speculative_config`` (None or empty: no speculation).

        Raises:
            ValueError: an unknown key, a method other than ``ngram``, or out-of-range lengths.
        """
        if not options:
            return None
        unknown = sorted(set(options) - set(SPECULATIVE_KEYS))
        if unknown:
            raise ValueError(f"engine_kwargs.hf.speculative_config: unknown keys {unknown} (known: {list(SPECULATIVE_KEYS)})")
        method = str(options.get("method", "ngram"))
        if method != "ngram":
            raise ValueError(f"engine_kwargs.hf.speculative_config.method: the hf rollout has 'ngram' only, got {method!r}")
        if "num_speculative_tokens" not in options:
            raise ValueError("engine_kwargs.hf.speculative_config needs num_speculative_tokens (e.g. 4)")
        return cls(
            num_tokens=int(options["num_speculative_tokens"]),
            lookup_max=int(options.get("prompt_lookup_max", 3)),
            lookup_min=int(options.get("prompt_lookup_min", 1)),
        )

    def propose(self, sequence: torch.Tensor, limit: int) -> list[int]:
        """Draft continuation of ``sequence`` ((L,) long: prompt and tokens generated so far).

        Returns at most ``min(num_tokens, limit)`` ids: those after the latest earlier occurrence of the
        sequence's last n tokens, for the longest n in [lookup_min, lookup_max] that occurs; [] if none.
        """
        width = min(self.num_tokens, limit)
        if width <= 0:
            return []
        length = int(sequence.shape[0])
        for n in range(min(self.lookup_max, length - 1), self.lookup_min - 1, -1):
            # windows starting at i with i + n <= length - 1: a token follows, and the suffix itself is excluded
            windows = sequence[: length - 1].unfold(0, n, 1)
            hits = torch.nonzero((windows == sequence[length - n :]).all(dim=1))
            if hits.numel():
                start = int(hits[-1, 0]) + n
                return sequence[start : start + width].tolist()
        return []


def accept_drafts(
    scaled: torch.Tensor,
    probs: torch.Tensor | None,
    drafts: torch.Tensor,
    draft_lens: torch.Tensor,
    greedy: torch.Tensor,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Check each row's draft against the model's distributions and pick the token after the kept part.

    Args:
        scaled: (bs, Q, V) temperature-scaled logits at the Q fed positions (the last emitted token, then
            the Q - 1 draft tokens); position j is the distribution of the token after draft j.
        probs: (bs, Q, V) sampling distributions (top-k/top-p applied) at those positions; None when every
            row is greedy.
        drafts: (bs, Q - 1) long draft tokens, padded beyond ``draft_lens``.
        draft_lens: (bs,) long number of real draft tokens per row.
        greedy: (bs,) bool, rows decoded greedily.
        generator: RNG of the acceptance tests and the final sample.

    Returns:
        ``tokens`` (bs, Q) long, whose first ``num_emitted`` entries per row are the emitted tokens (the
        kept drafts, then one token sampled at the first rejected or after the last draft), and
        ``num_emitted`` (bs,) long, between 1 and ``draft_lens + 1``. With Q == 1 this is plain sampling
        and draws from ``generator`` exactly as plain sampling does.
    """
    bs, q_len, _ = scaled.shape
    rows = torch.arange(bs, device=scaled.device)
    num_drafts = q_len - 1
    accepted = torch.zeros(bs, dtype=torch.long, device=scaled.device)
    if num_drafts > 0:
        real = torch.arange(num_drafts, device=scaled.device)[None] < draft_lens[:, None]
        keep = drafts == scaled[:, :num_drafts].argmax(dim=-1)
        if probs is not None:
            draft_probs = probs[:, :num_drafts].gather(2, drafts[..., None]).squeeze(2)
            uniform = torch.rand((bs, num_drafts), generator=generator, device=scaled.device)
            keep = torch.where(greedy[:, None], keep, uniform < draft_probs)
        accepted = (keep & real).long().cumprod(dim=1).sum(dim=1)

    final = scaled[rows, accepted].argmax(dim=-1)
    if probs is not None:
        final_probs = probs[rows, accepted]
        if num_drafts > 0:
            rejected = accepted < draft_lens
            rejected_token = drafts[rows, accepted.clamp(max=num_drafts - 1)]
            residual = final_probs.scatter(1, rejected_token[:, None], 0.0)
            # p(d) within rounding of 1 and still rejected (u >= p(d)): nothing left; keep p rather than fail
            residual = torch.where(residual.sum(dim=1, keepdim=True) > 0, residual, final_probs)
            final_probs = torch.where(rejected[:, None], residual, final_probs)
        sampled = torch.multinomial(final_probs, 1, generator=generator).squeeze(1)
        final = torch.where(greedy, final, sampled)

    tokens = torch.cat([drafts, drafts.new_zeros((bs, 1))], dim=1) if num_drafts > 0 else final[:, None].clone()
    tokens[rows, accepted] = final
    return tokens, accepted + 1
