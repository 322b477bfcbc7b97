"""Make tests/data/lmeval_tiny.json: per-sample numbers computed by lm-evaluation-harness itself on the tiny test
models, for test_eval_lmeval_parity.py to compare megatune's loglikelihood protocol against.

    python packages/evaluate/tests/lmeval_fixture.py --lmeval_python /tmp/lmeval/bin/python [--data_dir DIR]

Run it with the interpreter that has megatune installed (it builds the models with megatune.convert.testing, the
same calls the tests make); `--lmeval_python` is a separate virtualenv with lm-eval, e.g.
`python3 -m venv /tmp/lmeval && /tmp/lmeval/bin/pip install torch==2.13.0 "lm-eval[hf]==0.4.13"`.
That interpreter re-runs this file with `--lmeval_side`, which imports nothing from megatune: lm-eval's own `hf`
model, its own task configs (mmlu, ceval-valid, arc_easy/arc_challenge YAMLs `include`d unchanged, with only the
dataset pointed at local JSONL files converted here from shared/data), its own acc/acc_norm.

Two models: `tiny` (make_tiny_model("qwen2", seed=0), whose tokenizer adds no BOS) and `tiny-bos` (the same weights,
its tokenizer prepending <|endoftext|> as BOS, like a Llama tokenizer). The file records each model's sha256 so the
test can tell that it rebuilt the same models.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
FIXTURE = HERE / "data" / "lmeval_tiny.json"
DEFAULT_DATA = HERE.parents[2].parent / "shared" / "data"
# (model, lm-eval tasks, few-shot, limit): megatune's side of each run is in test_eval_lmeval_parity.py
RUNS = [
    ("tiny", ["local_mmlu_abstract_algebra", "local_mmlu_anatomy", "local_ceval_computer_network"], 0, 8),
    ("tiny", ["local_mmlu_abstract_algebra"], 2, 5),
    ("tiny", ["local_arc_challenge", "local_arc_easy"], 0, None),
    ("tiny-bos", ["local_mmlu_abstract_algebra", "local_arc_challenge"], 0, 8),
]
ARC_ROWS = 200  # the first 200 rows of each ARC file (rows whose answer cannot be trusted left out) are scored;
ARC_KEEP = 30  # the file keeps the samples of the first 30 docs, and every doc where dividing by len(" " + choice)
# instead of lm-eval's len(choice) picks another answer (the acc_norm bug of issue 18)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def fingerprint(model_dir: Path) -> dict:
    return {name: sha256(model_dir / name) for name in ("model.safetensors", "tokenizer.json")}


def add_bos(model_dir: Path) -> Path:
    """Make the tokenizer in `model_dir` prepend <|endoftext|> as BOS (a post-processor, as Llama's tokenizer has)."""
    tok_file, cfg_file = model_dir / "tokenizer.json", model_dir / "tokenizer_config.json"
    tok = json.loads(tok_file.read_text(encoding="utf-8"))
    bos = next(t for t in tok["added_tokens"] if t["content"] == "<|endoftext|>")
    special = {"SpecialToken": {"id": "<|endoftext|>", "type_id": 0}}
    tok["post_processor"] = {
        "type": "TemplateProcessing",
        "single": [special, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [special, {"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {"<|endoftext|>": {"id": "<|endoftext|>", "ids": [bos["id"]], "tokens": ["<|endoftext|>"]}},
    }
    tok_file.write_text(json.dumps(tok, ensure_ascii=False), encoding="utf-8")
    cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
    cfg["bos_token"] = "<|endoftext|>"
    cfg_file.write_text(json.dumps(cfg, ensure_ascii=False, indent=2), encoding="utf-8")
    return model_dir


def build_models(root: Path) -> dict[str, Path]:
    from megatune.convert.testing import make_tiny_model

    tiny = make_tiny_model("qwen2", root / "qwen2", seed=0, dtype="float32")  # as conftest's tiny_dir
    bos = root / "qwen2-bos"
    shutil.copytree(tiny, bos)
    return {"tiny": tiny, "tiny-bos": add_bos(bos)}


# ---------------------------------------------------------------- data for lm-eval (plain format conversion)
def arc_docs(data_dir: Path, subset: str) -> list[dict]:
    """The first ARC_ROWS rows of llm-foundry's file in the HF allenai/ai2_arc layout, the answer from AI2's key;
    rows whose choices repeat a text or whose key names a dropped choice are left out (no trustworthy answer)."""
    name = {"challenge": "ARC-Challenge", "easy": "ARC-Easy"}[subset]
    rows = (data_dir / "arc" / f"arc_{subset}.jsonl").read_text(encoding="utf-8").splitlines()[:ARC_ROWS]
    keys = (data_dir / "arc" / f"{name}-Test.question-answers.jsonl").read_text(encoding="utf-8").splitlines()
    docs = []
    for line, key_line in zip(rows, keys):
        row, key = json.loads(line), json.loads(key_line)
        answer = int(key["answerKey"]) - 1 if key["answerKey"].isdigit() else "ABCDE".index(key["answerKey"])
        if len(set(row["choices"])) < len(row["choices"]) or answer >= len(row["choices"]):
            continue
        labels = list("ABCDE"[:len(row["choices"])])
        docs.append({"id": key["id"], "question": row["query"].strip().removeprefix("Question:").strip(),
                     "choices": {"text": row["choices"], "label": labels}, "answerKey": labels[answer]})
    return docs


def write_tasks(data_dir: Path, out: Path, tasks_dir: Path) -> None:
    """JSONL data and task YAMLs that `include` lm-eval's own configs, changing only where the data comes from."""
    def dump(path: Path, docs: list[dict]) -> str:
        path.write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs), encoding="utf-8")
        return str(path)

    def yaml(task: str, include: Path, files: dict[str, str], *extra: str) -> None:
        lines = [f"include: {include}", f"task: {task}", "tag: []", "dataset_path: json", "dataset_name: null",
                 *extra, "dataset_kwargs:", "  data_files:"] + [f"    {split}: {path}" for split, path in files.items()]
        (out / f"{task}.yaml").write_text("\n".join(lines) + "\n", encoding="utf-8")

    for subject in ("abstract_algebra", "anatomy"):
        files = {}
        for split in ("test", "dev"):
            with open(data_dir / "mmlu" / split / f"{subject}_{split}.csv", newline="", encoding="utf-8") as f:
                docs = [{"question": r[0], "subject": subject, "choices": r[1:5], "answer": "ABCD".index(r[5].strip())}
                        for r in csv.reader(f)]
            files[split] = dump(out / f"mmlu_{subject}_{split}.jsonl", docs)
        yaml(f"local_mmlu_{subject}", tasks_dir / "mmlu" / "default" / f"mmlu_{subject}.yaml", files)
    files = {}
    for split in ("val", "dev"):
        with open(data_dir / "ceval" / split / f"computer_network_{split}.csv", newline="", encoding="utf-8") as f:
            docs = [{"explanation": "", **row} for row in csv.DictReader(f)]  # val has no explanation column
            files[split] = dump(out / f"ceval_computer_network_{split}.jsonl", docs)
    yaml("local_ceval_computer_network", tasks_dir / "ceval" / "ceval-valid_computer_network.yaml", files)
    for subset in ("challenge", "easy"):
        yaml(f"local_arc_{subset}", tasks_dir / "arc" / f"arc_{subset}.yaml",
             {"test": dump(out / f"arc_{subset}_test.jsonl", arc_docs(data_dir, subset))},
             "training_split: null", "validation_split: null")  # 0-shot: only the test split is local


# ---------------------------------------------------------------- lm-eval side (runs in lm-eval's virtualenv)
def lmeval_side(args: argparse.Namespace) -> int:
    import lm_eval
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    tasks_dir = Path(lm_eval.__file__).parent / "tasks"
    work = Path(args.work)
    write_tasks(Path(args.data_dir), work, tasks_dir)
    manager = TaskManager(include_path=str(work))
    runs = []
    for model, tasks, shots, limit in RUNS:
        out = simple_evaluate(model="hf", model_args=f"pretrained={args.models[model]},dtype=float32",
                              tasks=tasks, num_fewshot=shots, limit=limit, batch_size=1, device="cpu",
                              log_samples=True, task_manager=manager, random_seed=0)
        for task in tasks:
            samples = []
            for s in sorted(out["samples"][task], key=lambda s: s["doc_id"]):
                if "arc" in task and s["doc_id"] >= ARC_KEEP and not _norm_rule_matters(s):
                    continue
                samples.append({
                    "doc_id": s["doc_id"], "id": s["doc"].get("id"), "target": s["target"],
                    "context": s["arguments"][0][0],  # every choice has the same context
                    "continuations": [a[1] for a in s["arguments"]],
                    "loglikelihoods": [r[0][0] for r in s["resps"]], "is_greedy": [r[0][1] for r in s["resps"]],
                    "acc": s["acc"], **({"acc_norm": s["acc_norm"]} if "acc_norm" in s else {})})
            metrics = {k.split(",")[0]: v for k, v in out["results"][task].items() if k in ("acc,none", "acc_norm,none")}
            runs.append({"model": model, "task": task, "num_fewshot": shots, "limit": limit, **metrics,
                         "samples": samples})
    Path(args.out).write_text(json.dumps(runs, ensure_ascii=False), encoding="utf-8")
    return 0


def _norm_rule_matters(sample: dict) -> bool:
    lls = [r[0][0] for r in sample["resps"]]
    conts = [a[1] for a in sample["arguments"]]

    def pick(length) -> int:
        return max(range(len(lls)), key=lambda i: lls[i] / length(conts[i]))

    return pick(lambda c: len(c) - 1) != pick(len)  # lm-eval's choice length vs the delimiter counted


def dump_fixture(fixture: dict) -> str:
    """JSON with one line per run header and per sample (readable diffs, few lines)."""
    def one(x) -> str:
        return json.dumps(x, ensure_ascii=False)

    head = {k: v for k, v in fixture.items() if k != "runs"}
    runs = []
    for run in fixture["runs"]:
        meta = one({k: v for k, v in run.items() if k != "samples"})[:-1]
        runs.append(meta + ', "samples": [\n' + ",\n".join(one(s) for s in run["samples"]) + "]}")
    return one(head)[:-1] + ', "runs": [\n' + ",\n".join(runs) + "\n]}\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lmeval_python", default="/tmp/lmeval/bin/python")
    p.add_argument("--data_dir", default=str(DEFAULT_DATA))
    p.add_argument("--lmeval_side", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--work", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--models", type=json.loads, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.lmeval_side:
        return lmeval_side(args)
    with tempfile.TemporaryDirectory() as tmp:
        models = build_models(Path(tmp) / "models")
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_DATASETS_CACHE": f"{tmp}/cache",
               "TOKENIZERS_PARALLELISM": "false"}
        (Path(tmp) / "work").mkdir()
        cmd = [args.lmeval_python, __file__, "--lmeval_side", "--data_dir", args.data_dir, "--work", f"{tmp}/work",
               "--out", f"{tmp}/runs.json", "--models", json.dumps({k: str(v) for k, v in models.items()})]
        subprocess.run(cmd, check=True, env=env)
        runs = json.loads(Path(f"{tmp}/runs.json").read_text(encoding="utf-8"))
        probe = "import json, lm_eval, torch, transformers; print(json.dumps({'lm_eval': lm_eval.__version__, " \
                "'torch': torch.__version__, 'transformers': transformers.__version__}))"
        versions = subprocess.run([args.lmeval_python, "-c", probe], capture_output=True, text=True, check=True).stdout
        fixture = {
            "made_by": "python packages/evaluate/tests/lmeval_fixture.py (lm-evaluation-harness simple_evaluate, "
                       "model hf, dtype float32, batch_size 1, CPU)",
            "versions": json.loads(versions), "models": {k: fingerprint(v) for k, v in models.items()},
            "arc_rows": ARC_ROWS, "runs": runs,
        }
    FIXTURE.parent.mkdir(exist_ok=True)
    FIXTURE.write_text(dump_fixture(fixture), encoding="utf-8")
    print(f"wrote {FIXTURE} ({sum(len(r['samples']) for r in runs)} samples in {len(runs)} task runs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
