"""The simulator's token rule and text generation (pure functions, no server)."""
import pytest

from proxy.simulator.tokens import (
    apply_stop,
    chat_prompt_tokens,
    completion_prompt_token_counts,
    completion_prompt_tokens,
    count_text_tokens,
    generate_pieces,
    token_ids,
)


@pytest.mark.parametrize("text, expected", [
    ("", 0),
    ("   \n\t ", 0),
    ("Hello", 1),
    ("Hello, world!", 4),
    ("don't", 3),            # don ' t
    ("a_b c9 42", 3),        # \w includes digits and underscores
    ("...", 3),              # one token per punctuation character
    ("naïve café", 2),       # unicode letters are word characters
    ("x+y=z;", 6),
])
def test_count_text_tokens_follows_the_regex_rule(text, expected):
    assert count_text_tokens(text) == expected


def test_chat_prompt_is_4_per_message_plus_content_plus_2():
    messages = [
        {"role": "system", "content": "Be brief."},                       # 4 + 3
        {"role": "user", "content": [{"type": "text", "text": "Hi, you"},  # 4 + 3 + 1
                                     {"type": "image_url", "image_url": {"url": "http://x/y.png"}},
                                     {"type": "text", "text": "there"}]},
        {"role": "assistant", "content": None, "tool_calls": []},          # 4 + 0
    ]
    assert chat_prompt_tokens(messages) == (4 + 3) + (4 + 4) + 4 + 2


def test_completion_prompts_str_ids_and_lists():
    assert completion_prompt_tokens("one two, three") == 4
    assert completion_prompt_tokens([1, 2, 3, 4, 5]) == 5
    assert completion_prompt_token_counts(["a b", "c"]) == [2, 1]
    assert completion_prompt_token_counts([[1, 2], [3]]) == [2, 1]
    assert completion_prompt_tokens(["a b", "c"]) == 3


@pytest.mark.parametrize("n", [1, 2, 7, 16, 61, 500])
@pytest.mark.parametrize("choice", [0, 1, 5])
def test_generated_text_counts_as_exactly_the_generated_tokens(n, choice):
    pieces = generate_pieces(n, choice)
    assert len(pieces) == n
    assert all(count_text_tokens(piece) == 1 for piece in pieces)
    assert count_text_tokens("".join(pieces)) == n
    assert not pieces[0].startswith(" ")


def test_generation_is_deterministic_and_choices_differ():
    assert generate_pieces(16, 0) == generate_pieces(16, 0)
    assert generate_pieces(16, 0) != generate_pieces(16, 1)


def test_stop_string_cuts_text_but_counts_the_token_that_completed_it():
    pieces = generate_pieces(16)
    text = "".join(pieces)
    assert text.startswith("Sure, here is a simulated answer")
    cut, reason = apply_stop(pieces, ["nothing-like-this", " simulated"])
    assert reason == " simulated"
    assert "".join(cut) == "Sure, here is a"
    assert len(cut) == 6  # Sure , here is a simulated
    cut, _ = apply_stop(pieces, [" simulated"], include_stop=True)
    assert "".join(cut) == "Sure, here is a simulated"


def test_stop_spanning_tokens_and_list_order():
    pieces = generate_pieces(16)
    cut, reason = apply_stop(pieces, ["here is"])
    assert reason == "here is" and "".join(cut) == "Sure, " and len(cut) == 4
    cut, reason = apply_stop(pieces, ["xyz"])
    assert reason is None and cut == pieces


def test_tokenize_ids_match_the_counts():
    messages = [{"role": "user", "content": "Hello, world!"}]
    assert len(token_ids(messages=messages)) == chat_prompt_tokens(messages)
    assert len(token_ids(prompt="Hello, world!")) == 4
