"""Token-level turn cutting on the real SmolLM2 tokenizer (no veRL objects involved)."""

from __future__ import annotations

import pytest

from verl_selflock.episode.token_cut import (
    ENDED_BY_EOS,
    ENDED_BY_LENGTH,
    ENDED_BY_TAG,
    cap_text_tokens,
    cut_turn,
    end_of_turn_ids,
    first_closing_tag_prefix,
)


def enc(tok, text):
    return list(tok.encode(text, add_special_tokens=False))


@pytest.fixture(scope="module")
def tok(smollm2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)


@pytest.fixture(scope="module")
def eot(tok):
    return end_of_turn_ids(tok)


def test_end_of_turn_ids_follow_the_template(tok, llama3_tokenizer):
    assert end_of_turn_ids(tok) == enc(tok, "<|im_end|>\n")
    assert end_of_turn_ids(llama3_tokenizer) == [llama3_tokenizer.convert_tokens_to_ids("<|eot_id|>")]


def test_end_of_turn_ids_fallback_to_eos(smollm2_dir):
    from transformers import AutoTokenizer

    odd = AutoTokenizer.from_pretrained(smollm2_dir)
    odd.chat_template = "{% for m in messages %}{{ m['role'] }}{% endfor %}"  # never renders content
    assert end_of_turn_ids(odd) == [odd.eos_token_id]


@pytest.mark.parametrize(
    ("text", "kept_text", "env_text"),
    [
        # '><' is one token: the token is kept whole, the environment's text stops at the tag.
        (
            "<interact>Pair: 1,2</interact><scratch>more",
            "<interact>Pair: 1,2</interact><",
            "<interact>Pair: 1,2</interact>",
        ),
        ("<answer>1,2</answer>.", "<answer>1,2</answer>.", "<answer>1,2</answer>"),  # '>.' is one token
        ("<answer>1,2</answer> trailing", "<answer>1,2</answer>", "<answer>1,2</answer>"),
        # The first closing tag wins, whichever it is.
        ("<answer>1</answer><interact>x</interact>", "<answer>1</answer><", "<answer>1</answer>"),
        ("<interact>x</interact> then <answer>1</answer>", "<interact>x</interact>", "<interact>x</interact>"),
    ],
)
def test_cut_keeps_a_token_prefix_through_the_tag(tok, eot, text, kept_text, env_text):
    ids = enc(tok, text)
    cut = cut_turn(tok, ids, eot, stop_ids={eot[0]})
    assert cut.kept_ids == ids[: len(cut.kept_ids)]  # exactly the model's tokens
    assert tok.decode(cut.kept_ids) == kept_text
    assert cut.text == env_text and cut.ended_by == ENDED_BY_TAG
    assert cut.closing_ids == eot
    # The shortest such prefix: one token less no longer contains the tag.
    assert first_closing_tag_prefix(tok.decode, cut.kept_ids[:-1]) is None


def test_own_end_of_turn_token_is_kept(tok, eot):
    ids = enc(tok, "<interact>x</interact><|im_end|>")
    cut = cut_turn(tok, ids, eot, stop_ids={eot[0]})
    assert cut.kept_ids == ids and cut.closing_ids == eot[1:] and cut.ended_by == ENDED_BY_TAG
    # ... but not when generated text lies between the tag and it.
    ids = enc(tok, "<interact>x</interact> ok<|im_end|>")
    cut = cut_turn(tok, ids, eot, stop_ids={eot[0]})
    assert tok.decode(cut.kept_ids) == "<interact>x</interact>" and cut.closing_ids == eot


def test_no_tag(tok, eot):
    ids = enc(tok, "just words<|im_end|>")
    cut = cut_turn(tok, ids, eot, stop_ids={eot[0]})
    assert cut.kept_ids == ids and cut.text == "just words" and cut.tag is None and cut.ended_by == ENDED_BY_EOS
    ids = enc(tok, "just words and")
    cut = cut_turn(tok, ids, eot, stop_ids={eot[0]})
    assert cut.kept_ids == ids and cut.closing_ids == eot and cut.ended_by == ENDED_BY_LENGTH
    # Another stop token (<|endoftext|>) is dropped; the template closes the message.
    ids = enc(tok, "words<|endoftext|>")
    cut = cut_turn(tok, ids, eot, stop_ids={eot[0], tok.convert_tokens_to_ids("<|endoftext|>")})
    assert cut.kept_ids == enc(tok, "words") and cut.closing_ids == eot and cut.ended_by == ENDED_BY_EOS
    assert cut_turn(tok, [], eot, stop_ids={eot[0]}).kept_ids == []


def test_tag_split_across_many_tokens(tok, eot):
    """Build the tag from single-character tokens: the cut still lands right after '>'."""
    pieces = [enc(tok, ch) for ch in "<answer>9</answer>"]
    assert all(len(p) == 1 for p in pieces)
    ids = [p[0] for p in pieces] + enc(tok, " tail")
    cut = cut_turn(tok, ids, eot, stop_ids={eot[0]})
    assert cut.kept_ids == ids[: len(pieces)] and cut.text == "<answer>9</answer>"


@pytest.mark.parametrize("max_tokens", [5, 12, 40])
def test_cap_text_tokens(tok, max_tokens):
    text = "Feedback: " + "héllo wörld 日本語 " * 30
    capped, cut = cap_text_tokens(tok, text, max_tokens, marker=" ...(truncated)")
    assert cut and len(enc(tok, capped)) <= max_tokens
    assert "\ufffd" not in capped
    if max_tokens > len(enc(tok, " ...(truncated)")):
        assert capped.endswith(" ...(truncated)")
        assert text.startswith(capped[: -len(" ...(truncated)")])
    assert cap_text_tokens(tok, "short", max_tokens) == ("short", False)
