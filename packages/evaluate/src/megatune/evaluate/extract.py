"""Pull the answer out of a free-form reply: a choice letter for multiple choice, a number for GSM8K.

Multiple choice is a cascade, most explicit first, in the spirit of OpenCompass's / llmuses' ResponseParser:
a reply like "选项A的说法错误，所以答案是B" must give B, not the first letter it mentions. The first pattern that
matches wins; an empty string means "no answer" (scored wrong).

Numbers: an explicit final-answer marker (`\\boxed{}`, `####`, "the answer is") wins; otherwise the last number in
the reply, as llmuses did. Commas are thousands separators and are dropped; comparison is numeric, abs tol 1e-4.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

_LETTER = "{L}"  # replaced by a character class of the valid letters, e.g. [ABCD]

# (pattern, why it is here). Group 1 is the letter. Searched in order over the whole reply.
_MC_PATTERNS = [
    # explicit statements of the final answer, Chinese
    r"(?:正确)?答案(?:应该|应当|应)?(?:是|为|选|选择)?(?:选项)?\s*[:：]?\s*[（(\[【]?\s*" + _LETTER,
    r"(?:故|所以|因此|因而|综上)[，,]?\s*(?:本题)?(?:应|应该)?(?:选|选择|选项|答案为|答案是)\s*[（(]?\s*" + _LETTER,
    r"(?:应|应该|只能)(?:选|选择)\s*(?:选项)?\s*[（(]?\s*" + _LETTER,
    r"选项\s*[（(]?" + _LETTER + r"[)）]?\s*(?:是|为)?(?:正确|对)(?!性)",
    _LETTER + r"\s*(?:项|选项)?\s*(?:是|为)?(?:正确的|正确答案|对的)",
    # explicit statements, English
    r"(?i:answer)\s*(?:is|should be|would be|=)?\s*(?:option|choice)?\s*[:：]?\s*[\"'*(\[{]*\s*" + _LETTER + r"(?![A-Za-z])",
    r"(?i:the (?:correct|right|best) (?:option|choice) is)\s*[\"'*(\[]*\s*" + _LETTER + r"(?![A-Za-z])",
    r"(?i:(?:option|choice))\s*[(\[]?" + _LETTER + r"[)\]]?\s*(?i:is (?:the )?(?:correct|right))",
    r"\\boxed\{\s*(?:\\text\{)?\s*" + _LETTER,
    # the reply is (or starts with) just the letter: "B", "B.", "(B) text", "B：text"
    # ("A cat ..." starts with an article, not an answer: a space then a lowercase word does not count)
    r"^\s*[*(（\[【]*" + _LETTER + r"(?:\s*$|[)）\]】.。．:：,，、]|\s(?![a-z]))",
    # the reply ends with the letter: "... 所以选B。", "... so B."
    r"(?:^|[\s，,：:是为选])" + _LETTER + r"\s*[)）]?\s*[。.．!！]?\s*$",
]


def _compile(letters: str) -> list[re.Pattern]:
    cls = "([" + re.escape(letters) + "])(?![A-Za-z])"  # "answer: Because ..." is not option B
    return [re.compile(p.replace(_LETTER, cls), re.MULTILINE if p.startswith(r"^") else 0) for p in _MC_PATTERNS]


_CACHE: dict[str, list[re.Pattern]] = {}


def extract_choice(response: str, letters: str = "ABCD", choices: Sequence[str] = ()) -> str:
    """The choice letter a reply commits to, or "" when it commits to none.

    After the patterns, a letter standing alone (not part of a word, and not the article "A ...") is taken; last,
    when exactly one choice's text appears in the reply, its letter is.
    """
    patterns = _CACHE.get(letters) or _CACHE.setdefault(letters, _compile(letters))
    text = response.strip()
    for regex in patterns:
        m = regex.search(text)
        if m:
            return m.group(1)
    for m in re.finditer(r"(?<![A-Za-z0-9_])([" + re.escape(letters) + r"])(?![A-Za-z0-9_'])", text):
        if m.group(1) == "A" and re.match(r" [a-z]", text[m.end():m.end() + 2]):
            continue  # "A cat is ..." is an article, not option A
        return m.group(1)
    hits = [letters[i] for i, c in enumerate(choices[:len(letters)]) if c.strip() and c.strip() in text]
    return hits[0] if len(hits) == 1 else ""


_NUMBER = r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+"
_MARKERS = [
    re.compile(r"\\boxed\{\s*\\?\$?\s*(" + _NUMBER + r")"),
    re.compile(r"####\s*\$?\s*(" + _NUMBER + r")"),
    re.compile(r"(?i:answer is)\s*[:：]?\s*\$?\s*(" + _NUMBER + r")"),
    re.compile(r"答案(?:是|为)?\s*[:：]?\s*(" + _NUMBER + r")"),
]


def _clean_number(s: str) -> str:
    s = s.replace(",", "").rstrip(".")
    if s.startswith("-."):
        s = "-0" + s[1:]
    elif s.startswith("."):
        s = "0" + s
    return s


def extract_number(response: str) -> str:
    """The final numeric answer as a plain string ("1234", "-3.5"), or "" when the reply holds no number."""
    for regex in _MARKERS:
        found = regex.findall(response)
        if found:
            return _clean_number(found[-1])  # the last marker: a model may restate and correct itself
    found = re.findall(_NUMBER, response)
    return _clean_number(found[-1]) if found else ""


def numbers_equal(pred: str, gold: str, abs_tol: float = 1e-4) -> bool:
    try:
        return math.isclose(float(pred), float(gold), rel_tol=0.0, abs_tol=abs_tol)
    except ValueError:
        return False
