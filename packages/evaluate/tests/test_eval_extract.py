"""Answer extraction on crafted replies (Chinese and English phrasings, GSM8K number formats)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from megatune.evaluate.engine import split_context, truncate_at_stop
from megatune.evaluate.extract import extract_choice, extract_number, numbers_equal


@pytest.mark.parametrize("reply, letter", [
    ("答案是B", "B"),
    ("答案：C", "C"),
    ("正确答案为（D）。", "D"),
    ("选项A的说法错误，选项C也不对，所以答案是B。", "B"),
    ("根据题意分析，故选D", "D"),
    ("A项和B项都不符合，应选C。", "C"),
    ("选项D正确。", "D"),
    ("C是正确的", "C"),
    ("B", "B"),
    ("B.", "B"),
    ("(C) 12 m/s", "C"),
    ("D. Both potential energy and kinetic energy increase.", "D"),
    ("The answer is (C)", "C"),
    ("The answer is C.", "C"),
    ("Answer: B", "B"),
    ("Let me think. A cat cannot fly, so the correct answer is: D", "D"),
    ("The correct option is A because ...", "A"),
    ("Option B is correct.", "B"),
    ("After checking each one, I pick \\boxed{C}", "C"),
    ("**Answer: (A)**", "A"),
    ("Because the field is Q(sqrt 2, sqrt 3), the degree is 4, so it is B", "B"),
    ("A cat sat on the mat; none of this helps. C", "C"),
])
def test_choice_extraction(reply, letter):
    assert extract_choice(reply) == letter


def test_choice_extraction_gives_up_cleanly():
    assert extract_choice("I do not know.") == ""
    assert extract_choice("") == ""
    assert extract_choice("Answer: Because of gravity") == ""


def test_choice_text_fallback_and_letter_range():
    choices = ["liquid", "gas", "solid", "plasma"]
    assert extract_choice("Water has a definite shape when solid", "ABCD", choices) == "C"
    assert extract_choice("The answer is E", "ABCDE") == "E"
    assert extract_choice("The answer is E", "ABCD") == ""


@pytest.mark.parametrize("reply, number", [
    ("#### 1,234", "1234"),
    ("so the total is \\boxed{42}.", "42"),
    ("She makes 9 * 2 = $18 every day.", "18"),
    ("#### 18\nThat took 3 steps.", "18"),  # the marker wins over a later number
    ("The answer is -3.5.", "-3.5"),
    ("答案是 1,000,000", "1000000"),
    ("It costs $.50", "0.50"),
    ("no digits here", ""),
])
def test_number_extraction(reply, number):
    assert extract_number(reply) == number


def test_numbers_compare_with_tolerance():
    assert numbers_equal("18.00001", "18") and numbers_equal("1234", "1234.0")
    assert not numbers_equal("18.001", "18") and not numbers_equal("", "18")


@given(st.integers(-10**9, 10**9), st.sampled_from(["#### {}", "The answer is {}.", "\\boxed{{{}}}", "so {} dollars"]))
def test_number_round_trip_with_separators(n, template):
    assert extract_number("Some steps: 3 + 4 = 7.\n" + template.format(f"{n:,}")) == str(n)


@given(st.text(max_size=20), st.text(max_size=5).filter(lambda s: s.strip() == s), st.integers(0, 3))
def test_split_context_moves_only_trailing_space(ctx, cont, spaces):
    new_ctx, new_cont = split_context(ctx.rstrip() + " " * spaces, cont)
    assert new_ctx + new_cont == ctx.rstrip() + " " * spaces + cont and new_ctx == new_ctx.rstrip()


def test_truncate_at_earliest_stop():
    assert truncate_at_stop("42\n\nQuestion: next</s>", ["</s>", "Question:"]) == "42\n\n"
    assert truncate_at_stop("42", ["Question:"]) == "42"


def test_render_without_chat_template_falls_back_to_plain_turns():
    from types import SimpleNamespace

    from megatune.evaluate.engine import render

    base = SimpleNamespace(chat_template=None)
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}]
    assert render(base, msgs) == "System: Be brief.\nUser: 2+2?\nAssistant:"
    assert render(base, "raw text") == "raw text"
