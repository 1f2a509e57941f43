"""Token-level turn cutting for multi-turn rollouts (pure functions of a tokenizer: no veRL, no Ray).

A turn ends right after the first ``</interact>`` or ``</answer>`` (the rule of
:func:`verl_selflock.envs.parsing.cut_after_first_closing_tag`). The cut must keep exactly the
tokens the model generated, with their log-probs, so it is made on token boundaries: we keep the
shortest token prefix whose decoded text contains the closing tag. With BPE the tag often straddles
tokens (``</`` ``inter`` ``act`` ``>``) and its last character may share a token with what follows
(SmolLM2 has ``><``, ``>.``, ``>",`` ...): that token is kept whole, so the kept tokens can decode
to a few characters past the tag; the environment still receives the text cut exactly at the tag.

The assistant message is then closed with the chat template's end-of-turn tokens (ChatML
``<|im_end|>\\n``, Llama-3 ``<|eot_id|>``), derived from the template itself. If the model
emitted the end-of-turn token right after the tag (or ended its turn without any tag), that token is
its own and is kept with its log-prob; whatever the template adds after it is glue that the model
did not generate.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Any

from verl_selflock.envs.parsing import cut_after_first_closing_tag

TURN_TAGS = ("interact", "answer")
"""Tags whose closing form ends an agent turn."""

ENDED_BY_TAG = "tag"
ENDED_BY_EOS = "eos"
ENDED_BY_LENGTH = "length"

_PROBE = "SELFLOCKEOTPROBE"
_EOT_CACHE: dict[tuple[int, str, str], list[int]] = {}


@dataclass(frozen=True)
class TurnCut:
    """How one generation becomes an agent turn."""

    kept_ids: list[int]
    """Generated tokens kept: always a prefix ``token_ids[:len(kept_ids)]`` of the generation (so
    their log-probs are ``log_probs[:len(kept_ids)]``); it ends with the model's own end-of-turn
    token when that token directly followed the closing tag or ended a tag-less turn."""
    closing_ids: list[int]
    """Template tokens appended after ``kept_ids`` to close the assistant message (not generated)."""
    text: str
    """The turn's text as the environment sees it: cut right after the first closing tag."""
    tag: str | None
    """The closing tag that ended the turn, or None."""
    ended_by: str
    """``tag``: a closing tag; ``eos``: the model ended its turn without a tag;
    ``length``: the generation hit ``max_tokens`` without either."""


def end_of_turn_ids(tokenizer: Any, chat_template_kwargs: dict[str, Any] | None = None) -> list[int]:
    """Tokens the chat template writes after an assistant message's content.

    Rendered from the template with a probe message, so it follows whatever template the tokenizer
    carries (``<|im_end|>\\n`` for ChatML, ``<|eot_id|>`` for Llama 3). Falls back to
    ``[eos_token_id]`` if the template cannot be rendered or hides the probe.
    """
    kwargs = dict(chat_template_kwargs or {})
    key = (id(tokenizer), str(getattr(tokenizer, "chat_template", "")), repr(sorted(kwargs.items())))
    cached = _EOT_CACHE.get(key)
    if cached is not None:
        return list(cached)
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": _PROBE}]
    fallback = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    try:
        rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False, **kwargs)
    except Exception:  # noqa: BLE001  (any template error: use the fallback)
        rendered = None
    if not isinstance(rendered, str) or _PROBE not in rendered:
        ids = fallback
    else:
        suffix = rendered[rendered.rindex(_PROBE) + len(_PROBE) :]
        ids = list(tokenizer.encode(suffix, add_special_tokens=False)) if suffix else []
    _EOT_CACHE[key] = list(ids)
    return list(ids)


def first_closing_tag_prefix(
    decode: Callable[[Sequence[int]], str], token_ids: Sequence[int], tags: Sequence[str] = TURN_TAGS
) -> int | None:
    """Length of the shortest prefix of ``token_ids`` whose decoded text contains a closing tag.

    "Contains a closing tag" is monotone in the prefix length (a decoded prefix is a prefix of the
    decoded whole, up to an incomplete multi-byte character at its end, and tags are ASCII), so a
    binary search needs O(log n) decodes.

    Returns:
        The number of tokens to keep, or None if the whole sequence has no closing tag.
    """

    def has_tag(k: int) -> bool:
        return cut_after_first_closing_tag(decode(token_ids[:k]), tags)[1] is not None

    n = len(token_ids)
    if n == 0 or not has_tag(n):
        return None
    lo, hi = 1, n  # has_tag(hi) holds
    while lo < hi:
        mid = (lo + hi) // 2
        if has_tag(mid):
            hi = mid
        else:
            lo = mid + 1
    return lo


def cut_turn(
    tokenizer: Any,
    token_ids: Sequence[int],
    eot_ids: Sequence[int],
    stop_ids: Collection[int],
    tags: Sequence[str] = TURN_TAGS,
) -> TurnCut:
    """Cut one generation into an agent turn.

    Args:
        tokenizer: the policy's tokenizer.
        token_ids: the generated tokens, as the server returned them.
        eot_ids: the template's end-of-turn tokens (:func:`end_of_turn_ids`).
        stop_ids: token ids that end a generation (eos, the end-of-turn token); the generation is
            read only up to the first of them.
        tags: closing tags that end a turn.

    Returns:
        A :class:`TurnCut`.
    """

    def decode(ids: Sequence[int]) -> str:
        return tokenizer.decode(list(ids), skip_special_tokens=True)

    stop_pos = next((i for i, tok in enumerate(token_ids) if tok in stop_ids), None)
    content = list(token_ids[:stop_pos] if stop_pos is not None else token_ids)
    stop_tok = token_ids[stop_pos] if stop_pos is not None else None
    own_eot = bool(eot_ids) and stop_tok == eot_ids[0]

    tag_len = first_closing_tag_prefix(decode, content, tags)
    kept = content[:tag_len] if tag_len is not None else content
    if tag_len is not None:
        ended_by = ENDED_BY_TAG
    elif stop_tok is not None:
        ended_by = ENDED_BY_EOS
    else:
        ended_by = ENDED_BY_LENGTH
    # The model's own end-of-turn token is kept only when it directly follows what we keep: after a
    # tag with nothing in between, or at a tag-less natural end. Another stop token (e.g. a bare
    # <|endoftext|>) is dropped and the template's end-of-turn tokens close the message instead.
    if own_eot and len(kept) == len(content):
        kept = kept + [stop_tok]
        closing = list(eot_ids[1:])
    else:
        closing = list(eot_ids)
    text, tag = cut_after_first_closing_tag(decode(kept), tags)
    return TurnCut(
        kept_ids=kept, closing_ids=closing, text=text, tag=tag, ended_by=ended_by
    )


def cap_text_tokens(tokenizer: Any, text: str, max_tokens: int, marker: str = "") -> tuple[str, bool]:
    """Cap ``text`` at ``max_tokens`` tokens by cutting its *content* (never template tokens).

    The result, ``marker`` included, tokenizes to at most ``max_tokens`` tokens on its own; the chat
    template wraps it afterwards, intact.

    Returns:
        ``(text, truncated)``.
    """
    ids = tokenizer.encode(text, add_special_tokens=False)
    if len(ids) <= max_tokens:
        return text, False
    marker_len = len(tokenizer.encode(marker, add_special_tokens=False)) if marker else 0
    if marker_len >= max_tokens:
        marker, marker_len = "", 0
    keep = max_tokens - marker_len
    while keep > 0:
        # A cut inside a multi-byte character decodes to U+FFFD: drop it.
        head = tokenizer.decode(ids[:keep], skip_special_tokens=False).rstrip("\ufffd")
        capped = head + marker
        # Re-tokenizing a cut string can merge differently; shrink until it fits.
        if len(tokenizer.encode(capped, add_special_tokens=False)) <= max_tokens:
            return capped, True
        keep -= 1
    return "", True
