"""The task contract: every benchmark (ceval.py, mmlu.py, gsm8k.py, arc.py) is a subclass of `Task`, and the runner
reads nothing else.

A task says which split is scored and where few-shot examples come from, which subsets `--eval_dataset
name:SUBSET[,SUBSET]` may pick, how to load a split (local files under <eval_data_dir>/<name>/, else the hub, else
one error naming the local layout), the two prompts (Native: the user message; loglikelihood: lm-evaluation-harness's
context), and how a generated reply is scored. `MultipleChoiceTask` adds the choices scored by log-likelihood
(lm-eval's `doc_to_choice`, joined to the context by `target_delimiter`); acc_norm divides a choice's log-likelihood
by the length of that choice text in characters, without the delimiter, as lm-eval does.
"""

from __future__ import annotations

import difflib
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from megatune.evaluate.errors import UsageError
from megatune.evaluate.extract import extract_choice, extract_number, numbers_equal
from megatune.evaluate.tasks.common import LETTERS, data_root, offline_reason


@dataclass
class Example:
    subject: str
    question: str
    choices: list[str]  # option texts in label order (A, B, ...); empty for open questions (GSM8K)
    gold: str  # the letter for multiple choice, the number (as text) for GSM8K
    solution: str = ""  # the worked answer (GSM8K few-shot)
    id: str = ""
    defect: str = ""  # why this row cannot be scored fairly; such rows are counted but skipped when scoring
    extra: dict = field(default_factory=dict)

    @property
    def letters(self) -> str:
        return LETTERS[:len(self.choices)]

    @property
    def gold_index(self) -> int:
        return self.letters.index(self.gold)


Data = dict[str, list[Example]]  # subject -> examples, in file order


class Task(ABC):
    name: ClassVar[str]
    split: ClassVar[str]  # the split that is scored
    fewshot_split: ClassVar[str]  # where --eval_few_shot examples come from (first k per subject)
    eval_type: ClassVar[str]  # "multiple_choice" (scored by log-likelihood under that protocol) | "generate"
    metrics: ClassVar[tuple[str, ...]] = ("acc",)
    subsets: ClassVar[tuple[str, ...]]  # what may follow "name:" in --eval_dataset
    default_subsets: ClassVar[tuple[str, ...] | None] = None  # None: every subset
    stop: ClassVar[tuple[str, ...]] = ()  # where raw-text generation stops (loglikelihood protocol)

    # ------------------------------------------------------------------ data
    @abstractmethod
    def layout(self, split: str) -> str:
        """The local files of `split` under <eval_data_dir>/<name>/, for error messages."""

    @abstractmethod
    def load_local(self, folder: Path, split: str, subsets: tuple[str, ...] | None) -> Data | None:
        """The split read from `folder` (= <eval_data_dir>/<name>), or None when its files are not there.
        `subsets` None: every subject found there."""

    @abstractmethod
    def load_hub(self, split: str, subsets: tuple[str, ...]) -> Data:
        """The split from the Hugging Face hub (through `datasets`); `subsets` is never None here."""

    def subject_of(self, subset: str) -> str:
        """The subject name (the key of the loaded data) a subset stands for."""
        return subset

    def select(self, chosen: Sequence[str] | None) -> tuple[str, ...] | None:
        """The subsets to run: `chosen` checked against `subsets`, else the default (None: every subject there)."""
        if not chosen:
            return self.default_subsets
        for s in chosen:
            if s not in self.subsets:
                close = difflib.get_close_matches(s, self.subsets, n=1)
                hint = f"did you mean {self.name}:{close[0]}?" if close else \
                    f"choose from: {', '.join(self.subsets[:8])}{' ...' if len(self.subsets) > 8 else ''}"
                raise UsageError(f"--eval_dataset {self.name}:{s}: {self.name} has no subset {s!r}; {hint}")
        return tuple(dict.fromkeys(chosen))

    def load(self, root: str | Path | None, split: str | None = None, subsets: Sequence[str] | None = None) -> Data:
        """Local files under root/<name>, else the hub when reachable, else one UsageError naming the layout."""
        split, chosen, root = split or self.split, self.select(subsets), data_root(root)
        if root is not None:
            local = self.load_local(root / self.name, split, chosen)
            if local:
                missing = [s for s in subsets or () if self.subject_of(s) not in local]
                if missing:
                    raise UsageError(f"--eval_dataset {self.name}:{missing[0]}: no {split} data for it under "
                                     f"{root / self.name} (other subsets are there); expected {self.layout(split)}")
                return local
        reason = offline_reason()
        if reason is None:
            try:
                return self.load_hub(split, chosen or self.subsets)
            except Exception as e:  # network, auth, renamed repo: all end in the same advice
                first = str(e).splitlines()[0][:160] if str(e) else ""
                reason = f"the hub download failed ({type(e).__name__}: {first})"
        here = f"not under {root / self.name}" if root else "no --eval_data_dir / MEGATUNE_EVAL_DATA"
        if split == self.fewshot_split and split != self.split:
            raise UsageError(f"{self.name}: --eval_few_shot needs the few-shot split '{split}', which is {here} "
                             f"({reason}); put {self.layout(split)} in <eval_data_dir>/{self.name}/, "
                             f"or use --eval_few_shot 0")
        where = f"nothing usable under {root / self.name}" if root else "no --eval_data_dir / MEGATUNE_EVAL_DATA"
        raise UsageError(f"{self.name}: {where}, and {reason}; put the data at <eval_data_dir>/{self.name}/ as "
                         f"{self.layout(split)}")

    # ------------------------------------------------------------------ prompts and scoring
    @abstractmethod
    def native_prompt(self, ex: Example, shots: Sequence[Example] = ()) -> str:
        """The user message of the Native protocol (chat template applied by the engine)."""

    @abstractmethod
    def ll_context(self, ex: Example, shots: Sequence[Example] = ()) -> str:
        """lm-evaluation-harness's raw-text context (the loglikelihood protocol)."""

    @abstractmethod
    def score(self, ex: Example, response: str) -> tuple[str, bool]:
        """(answer extracted from a generated reply, whether it is right)."""

    def category(self, subject: str) -> str | None:
        """The breakdown group of a subject (C-Eval's four), or None."""
        return None

    def prompt_template(self) -> dict:
        """What eval_result.json records about the prompts."""
        probe = Example(subject=(self.default_subsets or self.subsets)[0], question="{question}",
                        choices=["{A}", "{B}", "{C}", "{D}"] if self.eval_type == "multiple_choice" else [],
                        gold="A" if self.eval_type == "multiple_choice" else "0")
        return {"native": self.native_prompt(probe), "loglikelihood": self.ll_context(probe)}


class MultipleChoiceTask(Task):
    eval_type = "multiple_choice"
    target_delimiter: ClassVar[str] = " "  # lm-eval's: between the context and each choice

    def choice_texts(self, ex: Example) -> list[str]:
        """lm-eval's doc_to_choice: the texts scored after the context (the letters, unless overridden)."""
        return list(ex.letters)

    def continuations(self, ex: Example) -> list[str]:
        return [self.target_delimiter + c for c in self.choice_texts(ex)]

    def score(self, ex: Example, response: str) -> tuple[str, bool]:
        extracted = extract_choice(response, ex.letters, ex.choices)
        return extracted, extracted == ex.gold


class NumberTask(Task):
    eval_type = "generate"

    def score(self, ex: Example, response: str) -> tuple[str, bool]:
        extracted = extract_number(response)
        return extracted, numbers_equal(extracted, ex.gold)
