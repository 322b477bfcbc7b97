"""Run benchmarks on an engine under one of two protocols and score every sample.

- `native` (what llmuses 0.4 "Native" did behind `swift eval`): chat template applied, greedy decoding,
  max_new_tokens 512, 0-shot unless --eval_few_shot; the answer is extracted from the generated text.
- `loglikelihood` (lm-evaluation-harness style, to cross-check with that harness): no chat template; multiple choice
  is decided by the log-probability of each choice's continuation (acc, and acc_norm = log-prob per character of
  the choice, reported for ARC); GSM8K, having no choices, generates from k worked examples and stops at "Question:".

Scores are micro averages over samples (llmuses' "WeightedAverageAccuracy"), broken down per subject (and per
category for C-Eval). Rows a loader marked defective are counted in `skipped`, not scored.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

from megatune.evaluate.engine import Engine, Sampling, UserError
from megatune.evaluate.extract import extract_choice, extract_number, numbers_equal
from megatune.evaluate.tasks import TASKS
from megatune.evaluate.tasks.common import Example, limit_per_subject
from tqdm import tqdm

PROTOCOLS = ("native", "loglikelihood")


@dataclass
class EvalSettings:
    datasets: list[str]
    protocol: str = "native"
    few_shot: int = 0
    limit: int | None = None  # per subject (per dataset for single-subject ones)
    data_dir: str | None = None
    max_new_tokens: int = 512
    system: str | None = None
    progress: bool = True
    extra: dict = field(default_factory=dict)

    def check(self) -> None:
        unknown = [d for d in self.datasets if d not in TASKS]
        if unknown:
            raise UserError(f"--eval_dataset {' '.join(unknown)}: unknown; choose from {' '.join(TASKS)}")
        if self.protocol not in PROTOCOLS:
            raise UserError(f"--eval_protocol {self.protocol!r} is not one of: {', '.join(PROTOCOLS)}")
        if self.few_shot < 0 or (self.limit is not None and self.limit < 1):
            raise UserError("--eval_few_shot must be >= 0 and --eval_limit >= 1")


def _shots(task, settings: EvalSettings) -> dict[str, list[Example]]:
    if settings.few_shot == 0:
        return {}
    pool = task.load(settings.data_dir, task.FEWSHOT_SPLIT)
    # the first k of each subject's few-shot split (lm-evaluation-harness' first_n sampler): reproducible
    return {s: rows[:settings.few_shot] for s, rows in pool.items()}


def _progress(settings: EvalSettings, total: int, desc: str, unit: str):
    return tqdm(total=total, desc=desc, unit=unit, disable=not settings.progress, file=sys.stderr, dynamic_ncols=True)


def _run_generate(engine: Engine, task, examples: list[Example], shots, settings: EvalSettings) -> list[dict]:
    chat = settings.protocol == "native"
    prompts, records = [], []
    for ex in examples:
        few = shots.get(ex.subject, [])
        if chat:
            text = task.native_prompt(ex, few)
            sys_msg = [{"role": "system", "content": settings.system}] if settings.system else []
            prompts.append([*sys_msg, {"role": "user", "content": text}])
        else:
            text = task.ll_context(ex, few)
            prompts.append(text)
        records.append({"dataset": task.NAME, "subject": ex.subject, "id": ex.id, "prompt": text})
    stop = () if chat else getattr(task, "STOP", ())
    sampling = Sampling(max_new_tokens=settings.max_new_tokens, temperature=0.0, stop=stop)
    with _progress(settings, len(prompts), task.NAME, "samples") as bar:
        responses = engine.generate(prompts, sampling, progress=bar)
    for ex, rec, response in zip(examples, records, responses):
        if task.KIND == "number":
            extracted = extract_number(response)
            correct = numbers_equal(extracted, ex.gold)
        else:
            extracted = extract_choice(response, ex.letters, ex.choices)
            correct = extracted == ex.gold
        rec.update(response=response, extracted=extracted, gold=ex.gold, correct=correct)
    return records


def _run_loglikelihood(engine: Engine, task, examples: list[Example], shots, settings: EvalSettings) -> list[dict]:
    requests, spans, records = [], [], []
    for ex in examples:
        context = task.ll_context(ex, shots.get(ex.subject, []))
        conts = task.ll_continuations(ex)
        spans.append((len(requests), len(conts)))
        requests += [(context, c) for c in conts]
        records.append({"dataset": task.NAME, "subject": ex.subject, "id": ex.id, "prompt": context})
    with _progress(settings, len(requests), task.NAME, "requests") as bar:
        scores = engine.loglikelihood(requests, progress=bar)
    for ex, rec, (start, n) in zip(examples, records, spans):
        lls = [s[0] for s in scores[start:start + n]]
        conts = [c for _, c in requests[start:start + n]]
        best = max(range(n), key=lls.__getitem__)
        # acc_norm divides by the continuation's length in characters, as lm-evaluation-harness does
        best_norm = max(range(n), key=lambda i: lls[i] / max(1, len(conts[i])))
        rec.update(response=conts[best], extracted=ex.letters[best], gold=ex.gold, correct=best == ex.gold_index,
                   correct_norm=best_norm == ex.gold_index, logprobs=[round(x, 6) for x in lls])
    return records


def _summarize(task, records: list[dict], skipped: int) -> dict:
    by_subject: dict[str, list[dict]] = {}
    for r in records:
        by_subject.setdefault(r["subject"], []).append(r)

    def acc(rows: list[dict], key: str = "correct") -> float:
        return sum(bool(r[key]) for r in rows) / len(rows) if rows else 0.0

    result = {
        "metric": "WeightedAverageAccuracy",
        "score": round(acc(records), 4),
        "num": len(records),
        "skipped": skipped,
        "subjects": {s: {"score": round(acc(rows), 4), "num": len(rows)} for s, rows in by_subject.items()},
    }
    if getattr(task, "REPORT_ACC_NORM", False) and records and "correct_norm" in records[0]:
        result["acc_norm"] = round(acc(records, "correct_norm"), 4)
        for s, rows in by_subject.items():
            result["subjects"][s]["acc_norm"] = round(acc(rows, "correct_norm"), 4)
    if hasattr(task, "category"):
        cats: dict[str, list[dict]] = {}
        for r in records:
            cats.setdefault(task.category(r["subject"]), []).append(r)
        result["categories"] = {c: {"score": round(acc(rows), 4), "num": len(rows)} for c, rows in sorted(cats.items())}
    return result


def prepare(settings: EvalSettings) -> dict[str, tuple[dict[str, list[Example]], dict[str, list[Example]]]]:
    """Load every dataset (limited per subject) and its few-shot pool before any model is loaded, so missing
    data fails in a second, not after minutes of loading weights. {name: (data by subject, shots by subject)}."""
    settings.check()
    return {name: (limit_per_subject(TASKS[name].load(settings.data_dir), settings.limit), _shots(TASKS[name], settings))
            for name in settings.datasets}


def evaluate(engine: Engine, settings: EvalSettings, prepared=None, on_samples=None) -> dict[str, dict]:
    """{dataset: summary}. `on_samples(dataset, records)` receives each dataset's per-sample records."""
    prepared = prepared if prepared is not None else prepare(settings)
    results = {}
    for name, (data, shots) in prepared.items():
        task = TASKS[name]
        examples = [ex for rows in data.values() for ex in rows if not ex.defect]
        skipped = sum(len(rows) for rows in data.values()) - len(examples)
        if not examples:
            raise UserError(f"{name}: no samples to evaluate (all rows skipped or the data is empty)")
        if settings.protocol == "native" or task.KIND == "number":
            records = _run_generate(engine, task, examples, shots, settings)
        else:
            records = _run_loglikelihood(engine, task, examples, shots, settings)
        if on_samples is not None:
            on_samples(name, records)
        results[name] = _summarize(task, records, skipped)
    return results
