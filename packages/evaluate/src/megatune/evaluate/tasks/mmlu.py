"""MMLU (57 subjects, 4 choices). Scored on `test`; few-shot examples come from `dev` (5 per subject).

Local layout: mmlu/{test,dev}/<subject>_{test,dev}.csv WITHOUT a header (question,A,B,C,D,answer).
Native prompt (llmuses 0.4) and loglikelihood context (lm-evaluation-harness mmlu) are the same text:
"The following are multiple choice questions (with answers) about {subject}.\\n\\n" + k shots +
"{question}\\nA. ..\\nD. ..\\nAnswer:"; loglikelihood scores " A" .. " D". A sample's id is "<subject>/<row>", the
0-based row in <subject>_test.csv, which is lm-eval's doc_id in its mmlu_<subject> task.
"""

from __future__ import annotations

from pathlib import Path

from megatune.evaluate.errors import EvalError
from megatune.evaluate.tasks.base import Data, Example, MultipleChoiceTask
from megatune.evaluate.tasks.common import choices_block, load_csv_subjects, load_hub

SUBJECTS = (
    "abstract_algebra anatomy astronomy business_ethics clinical_knowledge college_biology college_chemistry "
    "college_computer_science college_mathematics college_medicine college_physics computer_security "
    "conceptual_physics econometrics electrical_engineering elementary_mathematics formal_logic global_facts "
    "high_school_biology high_school_chemistry high_school_computer_science high_school_european_history "
    "high_school_geography high_school_government_and_politics high_school_macroeconomics high_school_mathematics "
    "high_school_microeconomics high_school_physics high_school_psychology high_school_statistics "
    "high_school_us_history high_school_world_history human_aging human_sexuality international_law jurisprudence "
    "logical_fallacies machine_learning management marketing medical_genetics miscellaneous moral_disputes "
    "moral_scenarios nutrition philosophy prehistory professional_accounting professional_law professional_medicine "
    "professional_psychology public_relations security_studies sociology us_foreign_policy virology world_religions"
).split()


def _example(subject: str, index: int, row: list[str], where: str) -> Example:
    if len(row) != 6 or row[5].strip() not in ("A", "B", "C", "D"):
        raise EvalError(f"{where}: expected 6 columns question,A,B,C,D,answer(A-D), got {row[:6]!r}")
    return Example(subject=subject, question=row[0].strip(), choices=row[1:5], gold=row[5].strip(),
                   id=f"{subject}/{index}")


def _block(ex: Example) -> str:
    return f"{ex.question}\n{choices_block(ex.choices, ex.letters)}\nAnswer:"


class Mmlu(MultipleChoiceTask):
    name, split, fewshot_split = "mmlu", "test", "dev"
    subsets = tuple(SUBJECTS)

    def layout(self, split: str) -> str:
        return f"{split}/<subject>_{split}.csv without header: question,A,B,C,D,answer"

    def load_local(self, folder: Path, split: str, subsets: tuple[str, ...] | None) -> Data | None:
        return load_csv_subjects(folder, split, False, _example, subsets)

    def load_hub(self, split: str, subsets: tuple[str, ...]) -> Data:
        out: Data = {}
        for s in subsets:
            out[s] = [Example(subject=s, question=row["question"].strip(), choices=list(row["choices"]),
                              gold="ABCD"[row["answer"]], id=f"{s}/{i}")
                      for i, row in enumerate(load_hub("cais/mmlu", s, split))]
        return out

    def _head(self, subject: str) -> str:
        return f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"

    def native_prompt(self, ex: Example, shots=()) -> str:
        return self._head(ex.subject) + "".join(f"{_block(s)} {s.gold}\n\n" for s in shots) + _block(ex)

    ll_context = native_prompt
