"""Run benchmarks on an engine under one of two protocols and score every sample.

- `native` (what llmuses 0.4 "Native" did behind `swift eval`): chat template applied, greedy decoding,
  max_new_tokens 512, 0-shot unless --eval_few_shot; the answer is extracted from the generated text.
- `loglikelihood` (lm-evaluation-harness 0.4 `multiple_choice`, to cross-check with that harness): no chat template;
  a multiple-choice question is decided by the log-probability of each choice after the context (acc), and by that
  log-probability divided by the choice text's length in characters (acc_norm, reported for ARC: lm-eval's
  `len(choice)`, the delimiter space not counted); GSM8K, having no choices, generates from k worked examples and
  stops at "Question:".

Scores are micro averages over samples (llmuses' "WeightedAverageAccuracy"), broken down per subject (and per
category for C-Eval). Rows a loader marked defective are counted in `skipped`, not scored.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

from megatune.evaluate.engine import Engine, Sampling
from megatune.evaluate.errors import EvalError, UsageError
from megatune.evaluate.selection import DatasetSpec, parse_specs
from megatune.evaluate.tasks import TASKS, Example, MultipleChoiceTask, Task
from tqdm import tqdm

PROTOCOLS = ("native", "loglikelihood")
ACC_NORM = "loglikelihood / len(choice text) in characters, delimiter not counted (lm-evaluation-harness acc_norm)"


@dataclass
class EvalSettings:
    datasets: list[str]
    protocol: str = "native"
    few_shot: int = 0
    limit: int | None = None  # per subject (per dataset for single-subject ones); a spec's #N wins
    data_dir: str | None = None
    max_new_tokens: int = 512
    system: str | None = None
    progress: bool = True
    extra: dict = field(default_factory=dict)

    def specs(self) -> list[DatasetSpec]:
        if self.protocol not in PROTOCOLS:
            raise UsageError(f"--eval_protocol {self.protocol!r} is not one of: {', '.join(PROTOCOLS)}")
        if self.few_shot < 0 or (self.limit is not None and self.limit < 1):
            raise UsageError("--eval_few_shot must be >= 0 and --eval_limit >= 1")
        specs = parse_specs(self.datasets, TASKS)
        for s in specs:
            TASKS[s.name].select(s.subsets)  # an unknown subset fails here, before any file is read
        return specs


@dataclass
class Prepared:
    task: Task
    spec: DatasetSpec
    data: dict[str, list[Example]]  # subject -> examples (limited)
    shots: dict[str, list[Example]]  # subject -> few-shot examples


def _progress(settings: EvalSettings, total: int, desc: str, unit: str):
    return tqdm(total=total, desc=desc, unit=unit, disable=not settings.progress, file=sys.stderr, dynamic_ncols=True)


def _run_generate(engine: Engine, p: Prepared, examples: list[Example], settings: EvalSettings) -> list[dict]:
    chat = settings.protocol == "native"
    prompts, records = [], []
    for ex in examples:
        few = p.shots.get(ex.subject, [])
        if chat:
            text = p.task.native_prompt(ex, few)
            sys_msg = [{"role": "system", "content": settings.system}] if settings.system else []
            prompts.append([*sys_msg, {"role": "user", "content": text}])
        else:
            text = p.task.ll_context(ex, few)
            prompts.append(text)
        records.append({"dataset": p.task.name, "subject": ex.subject, "id": ex.id, "prompt": text})
    sampling = Sampling(max_new_tokens=settings.max_new_tokens, temperature=0.0, stop=() if chat else p.task.stop)
    with _progress(settings, len(prompts), p.task.name, "samples") as bar:
        responses = engine.generate(prompts, sampling, progress=bar)
    for ex, rec, response in zip(examples, records, responses):
        extracted, correct = p.task.score(ex, response)
        rec.update(response=response, extracted=extracted, gold=ex.gold, correct=correct)
    return records


def _argmax(values: list[float]) -> int:
    return max(range(len(values)), key=values.__getitem__)  # the first of equal maxima, as numpy.argmax


def _run_loglikelihood(engine: Engine, p: Prepared, examples: list[Example], settings: EvalSettings) -> list[dict]:
    task = p.task
    assert isinstance(task, MultipleChoiceTask), task.name
    requests, spans, records = [], [], []
    for ex in examples:
        context = task.ll_context(ex, p.shots.get(ex.subject, []))
        conts = task.continuations(ex)
        spans.append((len(requests), len(conts)))
        requests += [(context, c) for c in conts]
        records.append({"dataset": task.name, "subject": ex.subject, "id": ex.id, "prompt": context})
    with _progress(settings, len(requests), task.name, "requests") as bar:
        scores = engine.loglikelihood(requests, progress=bar)
    for ex, rec, (start, n) in zip(examples, records, spans):
        lls = [s[0] for s in scores[start:start + n]]
        lengths = [float(len(c)) or 1.0 for c in task.choice_texts(ex)]
        best = _argmax(lls)
        best_norm = _argmax([ll / length for ll, length in zip(lls, lengths)])
        rec.update(response=requests[start + best][1], extracted=ex.letters[best], gold=ex.gold,
                   correct=best == ex.gold_index, correct_norm=best_norm == ex.gold_index,
                   logprobs=[round(x, 6) for x in lls], greedy=[s[1] for s in scores[start:start + n]])
    return records


def _summarize(task: Task, records: list[dict], skipped: int) -> dict:
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
    if "acc_norm" in task.metrics and records and "correct_norm" in records[0]:
        result["acc_norm"] = round(acc(records, "correct_norm"), 4)
        for s, rows in by_subject.items():
            result["subjects"][s]["acc_norm"] = round(acc(rows, "correct_norm"), 4)
    cats: dict[str, list[dict]] = {}
    for r in records:
        c = task.category(r["subject"])
        if c is not None:
            cats.setdefault(c, []).append(r)
    if cats:
        result["categories"] = {c: {"score": round(acc(rows), 4), "num": len(rows)} for c, rows in sorted(cats.items())}
    return result


def prepare(settings: EvalSettings) -> dict[str, Prepared]:
    """Load every dataset (limited per subject) and its few-shot pool before any model is loaded, so missing
    data fails in a second, not after minutes of loading weights."""
    out = {}
    for spec in settings.specs():
        task = TASKS[spec.name]
        limit = spec.limit if spec.limit is not None else settings.limit
        data = task.load(settings.data_dir, task.split, spec.subsets)
        data = data if limit is None else {s: rows[:limit] for s, rows in data.items()}
        shots = {}
        if settings.few_shot:
            pool = task.load(settings.data_dir, task.fewshot_split, spec.subsets)
            # the first k of each subject's few-shot split (lm-evaluation-harness' first_n sampler): reproducible
            shots = {s: rows[:settings.few_shot] for s, rows in pool.items()}
        out[spec.name] = Prepared(task, spec, data, shots)
    return out


def describe_protocol(settings: EvalSettings, prepared: dict[str, Prepared]) -> dict:
    """What eval_result.json records about how the scores were made (besides the engine's own description)."""
    native = settings.protocol == "native"
    detail = {
        "name": "llmuses 0.4 Native: chat template, greedy generation, answer extraction" if native else
        "lm-evaluation-harness 0.4 multiple_choice (raw text, no chat template); gsm8k generate_until",
        "chat_template": native,
        "few_shot": settings.few_shot,
        "few_shot_sampler": "first_n of the few-shot split",
        "datasets": {},
    }
    for name, p in prepared.items():
        entry = {"spec": str(p.spec), "subjects": len(p.data), "prompt_template": p.task.prompt_template()[
            "native" if native else "loglikelihood"]}
        if not native and isinstance(p.task, MultipleChoiceTask):
            entry["continuation"] = repr(p.task.target_delimiter) + " + choice " + (
                "text" if "acc_norm" in p.task.metrics else "letter")
            entry["normalisation"] = {"acc": "argmax loglikelihood"} | (
                {"acc_norm": ACC_NORM} if "acc_norm" in p.task.metrics else {})
        else:
            entry["normalisation"] = {"acc": "extracted answer == gold (extract.py)"}
        detail["datasets"][name] = entry
    return detail


def evaluate(engine: Engine, settings: EvalSettings, prepared=None, on_samples=None) -> dict[str, dict]:
    """{dataset: summary}. `on_samples(dataset, records)` receives each dataset's per-sample records."""
    prepared = prepared if prepared is not None else prepare(settings)
    results = {}
    for name, p in prepared.items():
        examples = [ex for rows in p.data.values() for ex in rows if not ex.defect]
        skipped = sum(len(rows) for rows in p.data.values()) - len(examples)
        if not examples:
            raise EvalError(f"{name}: no samples to evaluate (all rows skipped or the data is empty)")
        if settings.protocol == "native" or p.task.eval_type != "multiple_choice":
            records = _run_generate(engine, p, examples, settings)
        else:
            records = _run_loglikelihood(engine, p, examples, settings)
        if on_samples is not None:
            on_samples(name, records)
        results[name] = _summarize(p.task, records, skipped)
    return results
