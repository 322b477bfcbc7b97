"""`megatune eval --eval_protocol loglikelihood` against numbers lm-evaluation-harness 0.4.13 computed itself
(tests/data/lmeval_tiny.json, made by tests/lmeval_fixture.py: lm-eval's `hf` model, its own task configs and its
own acc/acc_norm, on the same tiny models): prompts byte for byte, every choice's log-likelihood and greediness,
every pick under acc and acc_norm, and the per-subject accuracies.
"""

from __future__ import annotations

import json

import pytest
from lmeval_fixture import FIXTURE, build_models, fingerprint
from megatune.evaluate.cli import eval_main

LMEVAL = json.loads(FIXTURE.read_text(encoding="utf-8"))
# megatune's side of lmeval_fixture.RUNS: (model, --eval_dataset specs, --eval_few_shot)
MEGATUNE_RUNS = {
    ("tiny", 0): ["mmlu:abstract_algebra,anatomy#8", "ceval:computer_network#8", "arc:challenge,easy#200"],
    ("tiny", 2): ["mmlu:abstract_algebra#5"],
    ("tiny-bos", 0): ["mmlu:abstract_algebra#8", "arc:challenge#8"],
}
SUBJECT = {"local_arc_challenge": "ARC-Challenge", "local_arc_easy": "ARC-Easy",
           "local_ceval_computer_network": "computer_network"}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    built = build_models(tmp_path_factory.mktemp("lmeval-models"))
    for name, path in built.items():
        if fingerprint(path) != LMEVAL["models"][name]:
            pytest.fail(f"the tiny model {name!r} built here differs from the one {FIXTURE.name} was made with "
                        f"(transformers/tokenizers changed its weights or vocabulary); regenerate it: "
                        f"python {FIXTURE.parent.parent / 'lmeval_fixture.py'} --lmeval_python <lm-eval venv python>")
    return built


def _megatune(model_dir, data_dir, out, specs, shots, *extra) -> tuple[dict, dict]:
    code = eval_main(["--ckpt_dir", str(model_dir), "--eval_protocol", "loglikelihood", "--eval_dataset", *specs,
                      "--eval_few_shot", str(shots), "--eval_data_dir", str(data_dir), "--eval_output_dir", str(out),
                      "--torch_dtype", "float32", "--progress", "false", *extra])
    assert code == 0
    result = json.loads((out / "eval_result.json").read_text(encoding="utf-8"))
    samples = [json.loads(x) for x in (out / "samples.jsonl").read_text(encoding="utf-8").splitlines()]
    return result, {(s["dataset"], s["id"]): s for s in samples}


def _key(task: str, sample: dict) -> tuple[str, str]:
    if task.startswith("local_mmlu_"):
        return "mmlu", f"{task.removeprefix('local_mmlu_')}/{sample['doc_id']}"
    return task.split("_")[1], sample["id"]


def _runs(model: str, shots: int) -> list[dict]:
    return [r for r in LMEVAL["runs"] if r["model"] == model and r["num_fewshot"] == shots]


@pytest.mark.parametrize("model, shots", list(MEGATUNE_RUNS))
def test_every_sample_matches_lmeval(models, data_dir, tmp_path, model, shots):
    result, ours = _megatune(models[model], data_dir, tmp_path, MEGATUNE_RUNS[(model, shots)], shots)
    compared = 0
    for run in _runs(model, shots):
        for want in run["samples"]:
            got = ours[_key(run["task"], want)]
            assert got["prompt"] == want["context"], want
            assert got["logprobs"] == pytest.approx(want["loglikelihoods"], abs=1e-4), want
            assert got["greedy"] == want["is_greedy"]
            assert got["correct"] == bool(want["acc"])
            if "acc_norm" in want and "correct_norm" in got:
                assert got["correct_norm"] == bool(want["acc_norm"]), want
            compared += 1
        dataset = _key(run["task"], run["samples"][0])[0]
        subject = SUBJECT.get(run["task"], run["task"].removeprefix("local_mmlu_"))
        scores = result["results"][dataset]["subjects"][subject]
        assert scores["score"] == round(run["acc"], 4)
        if dataset == "arc":
            assert scores["acc_norm"] == round(run["acc_norm"], 4)
    assert compared == sum(len(r["samples"]) for r in _runs(model, shots))


def test_fixture_can_tell_the_rules_apart():
    """The fixture holds ARC docs where dividing by len(" " + choice) picks another answer, and the BOS model's
    log-likelihoods differ from the plain one's: a wrong normalisation or a dropped BOS fails the test above."""
    arc = [s for r in LMEVAL["runs"] if "arc" in r["task"] and r["model"] == "tiny" for s in r["samples"]]
    flips = 0
    for s in arc:
        lls, conts = s["loglikelihoods"], s["continuations"]
        picks = [max(range(len(lls)), key=lambda i: lls[i] / f(conts[i])) for f in (lambda c: len(c) - 1, len)]
        flips += picks[0] != picks[1]
    assert flips >= 5
    plain = {s["doc_id"]: s for s in _runs("tiny", 0)[0]["samples"]}
    bos = _runs("tiny-bos", 0)[0]["samples"]
    assert max(abs(a - b) for s in bos for a, b in zip(s["loglikelihoods"], plain[s["doc_id"]]["loglikelihoods"])) > 0.01


def test_add_bos_token_false_drops_the_bos(models, data_dir, tmp_path):
    """--add_bos_token false on the BOS-adding tokenizer gives the plain model's numbers (same weights)."""
    _, ours = _megatune(models["tiny-bos"], data_dir, tmp_path, ["mmlu:abstract_algebra#8"], 0,
                        "--add_bos_token", "false")
    for want in _runs("tiny", 0)[0]["samples"]:
        assert ours[_key("local_mmlu_abstract_algebra", want)]["logprobs"] == pytest.approx(want["loglikelihoods"],
                                                                                          abs=1e-4)
