"""The C2C evaluation prompt and its scoring: the multiple-choice message, the answer prefix, the option
letters' token ids, and answer extraction from generated text.

Follows the reference evaluator (thu-nics/C2C ``rosetta/utils/evaluate.py``; docs/upstream_reference.md §5):

* :func:`build_mc_prompt` reproduces the reference's multiple-choice user message character for character
  (including the 19 spaces on the second line of the chain-of-thought variant).
* :func:`extract_answer` reproduces the reference's 4-stage answer extraction, generalised from A-D to the
  first ``num_choices`` letters, including its "math guard".
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import re
import string
from typing import TYPE_CHECKING, Sequence

import numpy as np

from c2c_jax.c2c.prompt import EncodedPrompt

if TYPE_CHECKING:
    from c2c_jax.evaluate.benchmarks import MCItem

logger = logging.getLogger(__name__)

LETTERS = string.ascii_uppercase
ANSWER_PREFIX = "The correct answer is"
# Text-to-text stage 1 (docs/upstream_reference.md §5.8): the sharer is asked for background, without the options.
T2T_BACKGROUND_PROMPT = "Briefly describe the most useful background to solve the problem:\n\n{question}"


# ---------------------------------------------------------------------------------------------
# Prompt.
# ---------------------------------------------------------------------------------------------

_HEADER = "Accurately answer the following question:"
_INSTRUCTIONS = (
    "Instructions:\n"
    "- Carefully read the question and all options.\n"
    "- Select the single most correct answer.\n"
    '- Respond ONLY in the following format: "The correct answer is A/B/C/D".\n'
    "- Do not include any explanations, additional text, or punctuation besides the answer."
)
_COT_INSTRUCTIONS = (
    "Instructions:\n"
    "- Carefully read the question and all options.\n"
    "- Let's think step by step and explain your reasoning briefly.\n"
    "- Then give the final answer starting with " + ANSWER_PREFIX
)


def format_choices(choices: Sequence[str]) -> str:
    """``"A. <text>\\n"`` per option, in order (the string ends with a newline, as in the reference)."""
    if len(choices) > len(LETTERS):
        raise ValueError(f"at most {len(LETTERS)} options are supported, got {len(choices)}")
    return "".join(f"{LETTERS[i]}. {text}\n" for i, text in enumerate(choices))


def build_mc_prompt(item: MCItem, *, use_cot: bool = False, use_template: bool = True) -> str:
    """The reference's multiple-choice user message for ``item`` (exact whitespace).

    * default: header line, blank line, question, blank line, ``Choices:`` and one ``X. text`` line per
      option, two blank lines, the four-bullet ``Instructions:`` block, blank line, and it ends with
      ``"The correct answer is"`` (:data:`ANSWER_PREFIX`, no trailing space).
    * ``use_cot``: the header is followed by a line of 19 spaces (as in the reference source), and the
      instructions ask for step-by-step reasoning; it ends with ``"... starting with The correct answer is"``.
    * ``use_template=False``: just ``question + "\\n\\nChoices:\\n" + options`` (ends with a newline;
      ``use_cot`` is then ignored, as in the reference).

    The instruction line says "A/B/C/D" whatever the number of options, as the reference does.
    """
    choices = format_choices(item.choices)
    if not use_template:
        return item.question + "\n\nChoices:\n" + choices
    if use_cot:
        return (
            _HEADER + "\n" + " " * 19 + "\n" + item.question + "\n\nChoices:\n" + choices + "\n\n"
            + _COT_INSTRUCTIONS
        )
    return (
        _HEADER + "\n\n" + item.question + "\n\nChoices:\n" + choices + "\n\n" + _INSTRUCTIONS
        + "\n\n" + ANSWER_PREFIX
    )


# ---------------------------------------------------------------------------------------------
# Answer extraction.
# ---------------------------------------------------------------------------------------------

# "label: rest" patterns of the reference, in its order. The reference lists each in three casings but
# searches case-insensitively, so one entry per distinct pattern is equivalent.
_LABEL_PATTERNS = tuple(
    re.compile(p, re.IGNORECASE)
    for p in (
        r"Answer:\s*(.*)",
        r"Your answer:\s*(.*)",
        r"The answer is\s*(.*)",
        r"Correct answer is\s*(.*)",
        r"Correct answer is:\s*(.*)",
        r"Correct answer:\s*(.*)",
        r"Jibu lako:\s*(.*)",  # Swahili (MMMLU)
        r"Jibu:\s*(.*)",
        r"Jibu sahihi:\s*(.*)",
        r"Response:\s*(.*)",
        r"Choice:\s*(.*)",
        r"Option:\s*(.*)",
    )
)
_MATH_INDICATORS = ("+", "-", "*", "/", "=", "^", "x^", "y^", "z^", "mod", "sqrt", "sin", "cos", "tan")
_ANSWER_WORDS = ("jibu", "answer", "choice", "option", "response", "correct", "sahihi")


@functools.lru_cache(maxsize=32)
def _letter_regexes(num_choices: int) -> tuple[tuple[re.Pattern, ...], re.Pattern]:
    cls = f"[A-{LETTERS[num_choices - 1]}]"
    standalone = (
        re.compile(rf"\b({cls})(?:\s*[.,!?:)]?\s*$)", re.IGNORECASE),  # letter at the end of the text
        re.compile(rf"\b({cls})(?:\s*[.,!?:)]\s)", re.IGNORECASE),  # letter + punctuation + space
        re.compile(rf"(?:^|\s)({cls})(?:\s*$)", re.IGNORECASE),  # whitespace/start + letter at the end
    )
    return standalone, re.compile(rf"\b({cls})\b", re.IGNORECASE)


def extract_answer(text: str, num_choices: int = 4) -> str | None:
    """Predicted option letter in a model's output, as the reference extracts it (or ``None``).

    1. The first of the reference's "label: rest" patterns (``answer:``, ``your answer:``, ``the answer is``,
       ``correct answer is``, ``correct answer is:``, ``correct answer:``, Swahili ``jibu ...``, ``response:``,
       ``choice:``, ``option:``; case-insensitive, rest = up to the end of that line) whose rest contains an
       UPPERCASE valid letter gives the first such letter -- even one inside a word, as in the reference.
    2. Else standalone-letter patterns (letter at the end; letter + punctuation + space; letter after
       whitespace at the end), case-insensitive, so a lowercase article "a" counts as "A"; the last match of
       the first pattern that matches wins -- unless the text contains math symbols (``+ - * / = ^ sqrt sin``
       ...) and no answer word (answer, choice, option, response, correct, jibu, sahihi).
    3. Else the last standalone letter anywhere (case-insensitive); ``None`` under the same math guard.
    4. Else the last UPPERCASE valid letter anywhere in the text (even inside a word).

    ``num_choices`` (1..26) sets the valid letters: A..D for 4, A..E for 5, ...
    """
    if not 1 <= num_choices <= len(LETTERS):
        raise ValueError(f"num_choices must be in 1..{len(LETTERS)}, got {num_choices}")
    if text is None:
        return None
    text = text.strip()
    if not text:
        return None
    valid = LETTERS[:num_choices]

    for pattern in _LABEL_PATTERNS:
        m = pattern.search(text)
        if m:
            for ch in m.group(1).strip():
                if ch in valid:
                    return ch

    has_math = any(ind in text for ind in _MATH_INDICATORS)
    lowered = text.lower()
    has_answer_words = any(w in lowered for w in _ANSWER_WORDS)
    guarded = has_math and not has_answer_words

    standalone, anywhere = _letter_regexes(num_choices)
    if not guarded:
        for pattern in standalone:
            found = pattern.findall(text)
            if found:
                return found[-1].upper()

    found = anywhere.findall(text)
    if found:
        return None if guarded else found[-1].upper()

    for ch in reversed(text):
        if ch in valid:
            return ch
    return None


# ------------------------------------------------------------------------------------------------
# Prompts.


def mc_messages(item: MCItem, *, use_cot: bool = False) -> list[dict]:
    """The MC prompt as a single user message (docs/upstream_reference.md §5.3)."""
    return [{"role": "user", "content": build_mc_prompt(item, use_cot=use_cot)}]


def background_messages(item: MCItem, background_prompt: str = T2T_BACKGROUND_PROMPT) -> list[dict]:
    """Text-to-text stage 1: the sharer is asked for background on the question, without the options."""
    return [{"role": "user", "content": background_prompt.format(question=item.question)}]


def t2t_messages(item: MCItem, message: str, *, background_prompt: str = T2T_BACKGROUND_PROMPT,
                 use_cot: bool = False) -> list[dict]:
    """Text-to-text stage 2: [user: background prompt, assistant: the sharer's text, user: MC prompt]."""
    return (background_messages(item, background_prompt) + [{"role": "assistant", "content": message}]
            + mc_messages(item, use_cot=use_cot))


def option_token_ids(tokenizer, num_options: int) -> list[int]:
    """Token ids scored for the option letters: the first token of " A", " B", ... (the reference).

    Tokenizers that split off the space (byte-level vocabularies without merges) would give every
    letter the same id; those fall back to the first token of the bare letter "A", "B", ...
    """
    for fmt in (" {}", "{}"):
        ids = []
        for letter in LETTERS[:num_options]:
            encoded = tokenizer(fmt.format(letter), add_special_tokens=False)["input_ids"]
            ids.append(int(encoded[0]) if encoded else -1)
        if -1 not in ids and len(set(ids)) == num_options:
            if fmt == "{}":
                logger.warning("the tokenizer has no distinct first tokens for ' A', ' B', ...; scoring the bare "
                               "letters 'A', 'B', ... instead")
            return ids
    raise ValueError(f"the tokenizer has no distinct tokens for the {num_options} option letters")


@dataclasses.dataclass(frozen=True)
class Prompt:
    """An encoded prompt and the number of trailing columns that run after fusion."""

    encoded: EncodedPrompt
    suffix: int  # 1 in generate mode; the answer prefix's columns in logits mode

    @property
    def width(self) -> int:
        return len(self.encoded.tokens)

    @property
    def num_tokens(self) -> int:
        return int(np.sum(self.encoded.valid))


def answer_prefix_columns(encoded: EncodedPrompt, tokenizer) -> int:
    """Trailing columns whose receiver tokens spell the answer prefix (at least)."""
    ids: list[int] = []
    for n in range(1, len(encoded.tokens)):
        column = len(encoded.tokens) - n
        if encoded.valid[column]:
            ids.insert(0, int(encoded.tokens[column]))
            if ANSWER_PREFIX in tokenizer.decode(ids):
                return n
    raise ValueError(f"the encoded prompt does not end with the answer prefix {ANSWER_PREFIX!r} (or has nothing "
                     "before it); does the chat template drop a continued assistant message?")


