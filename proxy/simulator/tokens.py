"""Deterministic token counting and text generation of the vLLM simulator (pure, no I/O).

The token rule (tests and the gateway's tests compute expected usage with it):

* a text's token count is the number of matches of ``\\w+|[^\\w\\s]``: one token per
  word (a run of letters, digits or underscores) and one per punctuation character;
  whitespace is free. ``"Hello, world!"`` is 4 tokens.
* a chat prompt is ``sum(4 + tokens(content) for each message) + 2``. ``content`` may be
  a string, ``None`` (0 tokens) or a list of parts, of which only ``{"type": "text",
  "text": ...}`` parts count. Roles, names and tool calls cost nothing beyond the 4.
* a completions prompt: a string counts by the rule, a list of ints counts its length;
  a list of strings (or of int lists) is several prompts, and usage sums them.

Generated text is a fixed cycle of words and punctuation marks. Each generated token is
one word (with a leading space except at the very start) or one punctuation character,
so ``count_text_tokens(generated_text) == completion_tokens`` for a choice, except when
a ``stop`` string matched: then the tokens up to the one that completed the match are
counted (as vLLM does) while the text is cut before the stop string.
"""
from __future__ import annotations

import re
import zlib
from typing import Any, Sequence

__all__ = [
    "TOKEN_RE",
    "count_text_tokens",
    "content_tokens",
    "chat_prompt_tokens",
    "completion_prompt_token_counts",
    "completion_prompt_tokens",
    "generate_pieces",
    "apply_stop",
    "token_ids",
]

TOKEN_RE = re.compile(r"\w+|[^\w\s]")

# Overhead of the chat template per message (<|im_start|>, role, newline, <|im_end|>)
# and of the generation prompt (<|im_start|>assistant).
MESSAGE_OVERHEAD = 4
REPLY_PRIMING = 2


def count_text_tokens(text: str) -> int:
    """Return the number of tokens of ``text``: one per word, one per punctuation mark."""
    return len(TOKEN_RE.findall(text))


def content_tokens(content: Any) -> int:
    """Tokens of a chat message ``content``: a string, None, or a list of text parts."""
    if content is None:
        return 0
    if isinstance(content, str):
        return count_text_tokens(content)
    total = 0
    for part in content:
        if isinstance(part, dict) and part.get("type") == "text":
            total += count_text_tokens(part.get("text") or "")
    return total


def chat_prompt_tokens(messages: Sequence[dict[str, Any]]) -> int:
    """Prompt tokens of a chat request: sum of (4 + content tokens) per message, plus 2."""
    return sum(MESSAGE_OVERHEAD + content_tokens(m.get("content")) for m in messages) + REPLY_PRIMING


def completion_prompt_token_counts(prompt: Any) -> list[int]:
    """Token count of each prompt of a completions request (vLLM runs each separately)."""
    if isinstance(prompt, str):
        return [count_text_tokens(prompt)]
    if prompt and all(isinstance(x, int) for x in prompt):
        return [len(prompt)]
    return [count_text_tokens(p) if isinstance(p, str) else len(p) for p in prompt]


def completion_prompt_tokens(prompt: Any) -> int:
    """Prompt tokens of a completions request (summed over a list of prompts)."""
    return sum(completion_prompt_token_counts(prompt))


# --- generation ---------------------------------------------------------------------

_CYCLE_TEXT = (
    "Sure, here is a simulated answer from the model. It has plain words and "
    "punctuation, so every token is easy to count! Each reply is deterministic; "
    "tests can rely on it. The quick brown fox jumps over the lazy dog, again and again."
)
_CYCLE = TOKEN_RE.findall(_CYCLE_TEXT)
# piece at position > 0: words get a leading space, punctuation sticks to the previous token
_SPACED = [(" " + t) if (t[0].isalnum() or t[0] == "_") else t for t in _CYCLE]
_CYCLE_LEN = len(_CYCLE)
CHOICE_OFFSET = 7  # choice i starts 7*i tokens into the cycle, so n>1 choices differ


def generate_pieces(n_tokens: int, choice_index: int = 0) -> list[str]:
    """Return the text of each of ``n_tokens`` generated tokens; each counts as one token."""
    if n_tokens <= 0:
        return []
    start = (choice_index * CHOICE_OFFSET) % _CYCLE_LEN
    reps = (start + n_tokens) // _CYCLE_LEN + 1
    pieces = (_SPACED * reps)[start:start + n_tokens]
    pieces[0] = _CYCLE[start]
    return pieces


def apply_stop(
    pieces: list[str], stops: Sequence[str], include_stop: bool = False
) -> tuple[list[str], str | None]:
    """Cut generation at the first stop string found, the way vLLM's detokenizer does.

    After each token, the stop strings are searched (in list order) in the text that
    the new token could have completed. On a match the token list ends with that token
    (so it still counts toward ``completion_tokens``) and the text is cut before the
    stop string (or after it with ``include_stop``); pieces past the cut become "".
    Returns (pieces, matched stop string or None).
    """
    stops = [s for s in stops if s]
    if not stops:
        return pieces, None
    text = ""
    for k, piece in enumerate(pieces):
        prev = len(text)
        text += piece
        for s in stops:
            i = text.find(s, max(0, prev - len(s) + 1))
            if i != -1:
                limit = i + len(s) if include_stop else i
                out, pos = [], 0
                for p in pieces[:k + 1]:
                    out.append(p[:max(0, limit - pos)])
                    pos += len(p)
                return out, s
    return pieces, None


# --- /tokenize ----------------------------------------------------------------------

IM_START, IM_END, NEWLINE = 151644, 151645, 198
_ROLE_IDS = {"system": 8948, "user": 872, "assistant": 77091, "tool": 14172}


def _text_ids(text: str) -> list[int]:
    return [zlib.crc32(t.encode()) % 151000 for t in TOKEN_RE.findall(text)]


def token_ids(*, prompt: str | None = None, messages: Sequence[dict[str, Any]] | None = None) -> list[int]:
    """Fake but stable token ids whose count follows the token rule (for /tokenize)."""
    if messages is None:
        return _text_ids(prompt or "")
    ids: list[int] = []
    for m in messages:
        content = m.get("content")
        if isinstance(content, list):
            content = " ".join(
                p.get("text") or "" for p in content if isinstance(p, dict) and p.get("type") == "text"
            )
        ids += [IM_START, _ROLE_IDS.get(m.get("role"), 872), NEWLINE]
        ids += _text_ids(content or "")
        ids.append(IM_END)
    return ids + [IM_START, _ROLE_IDS["assistant"]]
