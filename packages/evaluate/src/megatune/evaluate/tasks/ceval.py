"""C-Eval (52 Chinese exam subjects, 4 choices). Scored on `val` (the public test split has no answers).

Local layout: ceval/{val,dev}/<subject>_{val,dev}.csv WITH a header row (id,question,A,B,C,D,answer[,explanation]).
Native prompt (llmuses 0.4): "以下是中国关于{科目}考试的单项选择题，请选出其中的正确答案。" + question + options + "答案："
Loglikelihood (lm-evaluation-harness ceval-valid): "以下是中国关于{科目}的单项选择题，请选出其中的正确答案。\n\n"
+ k shots + "{question}\nA. ..\n答案：" scored against " A" .. " D".
"""

from __future__ import annotations

from pathlib import Path

from megatune.evaluate.errors import EvalError
from megatune.evaluate.tasks.base import Data, Example, MultipleChoiceTask
from megatune.evaluate.tasks.common import choices_block, load_csv_subjects, load_hub

# subject -> (Chinese name used in the prompt, category for the breakdown)
SUBJECTS = {
    "computer_network": ("计算机网络", "STEM"), "operating_system": ("操作系统", "STEM"),
    "computer_architecture": ("计算机组成", "STEM"), "college_programming": ("大学编程", "STEM"),
    "college_physics": ("大学物理", "STEM"), "college_chemistry": ("大学化学", "STEM"),
    "advanced_mathematics": ("高等数学", "STEM"), "probability_and_statistics": ("概率统计", "STEM"),
    "discrete_mathematics": ("离散数学", "STEM"), "electrical_engineer": ("注册电气工程师", "STEM"),
    "metrology_engineer": ("注册计量师", "STEM"), "high_school_mathematics": ("高中数学", "STEM"),
    "high_school_physics": ("高中物理", "STEM"), "high_school_chemistry": ("高中化学", "STEM"),
    "high_school_biology": ("高中生物", "STEM"), "middle_school_mathematics": ("初中数学", "STEM"),
    "middle_school_biology": ("初中生物", "STEM"), "middle_school_physics": ("初中物理", "STEM"),
    "middle_school_chemistry": ("初中化学", "STEM"), "veterinary_medicine": ("兽医学", "STEM"),
    "college_economics": ("大学经济学", "Social Science"), "business_administration": ("工商管理", "Social Science"),
    "marxism": ("马克思主义基本原理", "Social Science"),
    "mao_zedong_thought": ("毛泽东思想和中国特色社会主义理论体系概论", "Social Science"),
    "education_science": ("教育学", "Social Science"), "teacher_qualification": ("教师资格", "Social Science"),
    "high_school_politics": ("高中政治", "Social Science"), "high_school_geography": ("高中地理", "Social Science"),
    "middle_school_politics": ("初中政治", "Social Science"),
    "middle_school_geography": ("初中地理", "Social Science"),
    "modern_chinese_history": ("近代史纲要", "Humanities"),
    "ideological_and_moral_cultivation": ("思想道德修养与法律基础", "Humanities"),
    "logic": ("逻辑学", "Humanities"), "law": ("法学", "Humanities"),
    "chinese_language_and_literature": ("中国语言文学", "Humanities"), "art_studies": ("艺术学", "Humanities"),
    "professional_tour_guide": ("导游资格", "Humanities"), "legal_professional": ("法律职业资格", "Humanities"),
    "high_school_chinese": ("高中语文", "Humanities"), "high_school_history": ("高中历史", "Humanities"),
    "middle_school_history": ("初中历史", "Humanities"), "civil_servant": ("公务员", "Other"),
    "sports_science": ("体育学", "Other"), "plant_protection": ("植物保护", "Other"),
    "basic_medicine": ("基础医学", "Other"), "clinical_medicine": ("临床医学", "Other"),
    "urban_and_rural_planner": ("注册城乡规划师", "Other"), "accountant": ("注册会计师", "Other"),
    "fire_engineer": ("注册消防工程师", "Other"),
    "environmental_impact_assessment_engineer": ("环境影响评价工程师", "Other"),
    "tax_accountant": ("税务师", "Other"), "physician": ("医师资格", "Other"),
}


def _example(subject: str, index: int, row: dict, where: str) -> Example:
    answer = (row.get("answer") or "").strip()
    if answer not in ("A", "B", "C", "D"):
        raise EvalError(f"{where}: answer {answer!r} is not one of A-D")
    return Example(subject=subject, question=row["question"].strip(), choices=[row[c] for c in "ABCD"],
                   gold=answer, solution=row.get("explanation") or "", id=str(row.get("id", index)))


def _block(ex: Example) -> str:
    return f"{ex.question}\n{choices_block(ex.choices, ex.letters)}\n答案："


class Ceval(MultipleChoiceTask):
    name, split, fewshot_split = "ceval", "val", "dev"
    subsets = tuple(SUBJECTS)

    def layout(self, split: str) -> str:
        return f"{split}/<subject>_{split}.csv with header id,question,A,B,C,D,answer"

    def load_local(self, folder: Path, split: str, subsets: tuple[str, ...] | None) -> Data | None:
        return load_csv_subjects(folder, split, True, _example, subsets)

    def load_hub(self, split: str, subsets: tuple[str, ...]) -> Data:
        return {s: [_example(s, i, row, f"ceval/ceval-exam {s}/{split} row {i + 1}")
                    for i, row in enumerate(load_hub("ceval/ceval-exam", s, split))] for s in subsets}

    def category(self, subject: str) -> str | None:
        return SUBJECTS.get(subject, (subject, "Other"))[1]

    def native_prompt(self, ex: Example, shots=()) -> str:
        head = f"以下是中国关于{SUBJECTS.get(ex.subject, (ex.subject,))[0]}考试的单项选择题，请选出其中的正确答案。\n"
        return head + "".join(f"问题：{_block(s)}{s.gold}\n\n" for s in shots) + f"问题：{_block(ex)}"

    def ll_context(self, ex: Example, shots=()) -> str:
        head = f"以下是中国关于{SUBJECTS.get(ex.subject, (ex.subject,))[0]}的单项选择题，请选出其中的正确答案。\n\n"
        return head + "".join(f"{_block(s)} {s.gold}\n\n" for s in shots) + _block(ex)
