"""The pt engine against plain forward passes of the same tiny model (fp32): scores, greediness, batching,
deterministic generation."""

from __future__ import annotations

import pytest
import torch
from megatune.evaluate.engine import Sampling

CONTEXTS = [
    "Question: Which gas do plants take in?\nAnswer:",
    "以下是中国关于计算机网络的单项选择题，请选出其中的正确答案。\n\nTCP端对端通信作用于____\nA. 主机之间\n答案：",
    "The following are multiple choice questions (with answers) about algebra.\n\n2+2=?\nA. 3\nB. 4\nAnswer: ",
    "Hi",
]
CONTINUATIONS = [" carbon dioxide", " A", "B", " there, how are you today?"]


def reference(engine, context: str, continuation: str) -> tuple[float, bool]:
    """One unpadded forward pass over context+continuation, tokenized as lm-evaluation-harness does."""
    tok = engine.tokenizer
    n = len(context) - len(context.rstrip())
    if n:
        context, continuation = context[:-n], context[-n:] + continuation
    whole = tok(context + continuation, add_special_tokens=False)["input_ids"]
    ctx_len = len(tok(context, add_special_tokens=False)["input_ids"])
    with torch.no_grad():
        logits = engine.model(input_ids=torch.tensor([whole], device=engine.device)).logits[0]  # (T, V)
    logprobs = torch.log_softmax(logits.double(), -1)
    targets = torch.tensor(whole[ctx_len:], device=engine.device)
    rows = logprobs[ctx_len - 1:len(whole) - 1]  # row t predicts token t+1
    return rows.gather(-1, targets[:, None]).sum().item(), bool((rows.argmax(-1) == targets).all())


def test_loglikelihood_equals_forward_pass(engine):
    requests = [(c, x) for c in CONTEXTS for x in CONTINUATIONS]
    got = engine.loglikelihood(requests)
    for (c, x), (lp, greedy) in zip(requests, got):
        want_lp, want_greedy = reference(engine, c, x)
        assert lp == pytest.approx(want_lp, abs=1e-4), (c, x)
        assert greedy == want_greedy, (c, x)


def test_is_greedy_true_exactly_for_the_argmax_token(engine):
    context = "Question: What is 2+2?\nAnswer:"
    ids = engine.encode(context)
    with torch.no_grad():
        ranked = engine.model(input_ids=torch.tensor([ids], device=engine.device)).logits[0, -1].argsort(descending=True)
    # pick top-1 and top-2 tokens whose text re-encodes to exactly that one token after the context
    usable = []
    for t in ranked[:50].tolist():
        text = engine.tokenizer.decode([t])
        if engine.encode(context + text)[len(ids):] == [t]:
            usable.append((t, text))
    assert usable and usable[0][0] == ranked[0].item(), "the top-1 token should round-trip through text"
    (_, top_text), (_, other_text) = usable[0], usable[1]
    (lp_top, g_top), (lp_other, g_other) = engine.loglikelihood([(context, top_text), (context, other_text)])
    assert g_top and not g_other and lp_top > lp_other


def test_batched_equals_unbatched(engine):
    requests = [(c, x) for c in CONTEXTS for x in CONTINUATIONS]
    batched = engine.loglikelihood(requests)
    old = engine.batch_size
    engine.batch_size = 1
    try:
        single = [engine.loglikelihood([r])[0] for r in requests]
    finally:
        engine.batch_size = old
    for (a, ga), (b, gb) in zip(batched, single):
        assert a == pytest.approx(b, abs=1e-5) and ga == gb


def test_shared_inputs_are_scored_once_but_correctly(engine, monkeypatch):
    """One-token answers to one question need one row; the result matches scoring each alone.
    (" D" is two tokens in the tiny 1000-word vocabulary, so it would need its own row.)"""
    context = CONTEXTS[0]
    requests = [(context, f" {letter}") for letter in "ABC"]
    assert all(len(engine.encode(context + x)) == len(engine.encode(context)) + 1 for _, x in requests)
    calls = []
    forward = engine.model.forward

    def counting(*args, **kw):
        calls.append(kw["input_ids"].shape[0])
        return forward(*args, **kw)

    monkeypatch.setattr(engine.model, "forward", counting)
    together = engine.loglikelihood(requests)
    assert calls == [1]
    for r, (lp, _) in zip(requests, together):
        assert lp == pytest.approx(reference(engine, *r)[0], abs=1e-4)


def test_generation_is_deterministic_and_batch_independent(engine):
    prompts = [[{"role": "user", "content": "who are you?"}], "Question: 1+1?\nAnswer:",
               [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "你好"}]]
    sampling = Sampling(max_new_tokens=8)
    first = engine.generate(prompts, sampling)
    assert first == engine.generate(prompts, sampling)
    assert first == [engine.generate([p], sampling)[0] for p in prompts]
    assert all(isinstance(t, str) and t for t in first)


def test_stream_matches_generate(engine):
    messages = [{"role": "user", "content": "tell me a story"}]
    sampling = Sampling(max_new_tokens=12)
    assert "".join(engine.stream(messages, sampling)) == engine.generate([messages], sampling)[0]


def test_sampling_with_seed_is_reproducible(engine):
    sampling = Sampling(max_new_tokens=8, temperature=1.0, top_p=0.9, seed=1)
    assert engine.generate(["Hello"], sampling) == engine.generate(["Hello"], sampling)


def test_one_forward_per_context_with_its_continuations_as_branches(engine, monkeypatch):
    """Multi-token answers (ARC's texts) share their context: one row holds the context once plus every answer
    but its last token, and each score still equals a separate forward over context + answer."""
    context, answers = CONTEXTS[0], [" carbon dioxide", " oxygen gas", " water vapour and more"]
    ctx, conts = engine.encoder.pair(context, answers[0])[0], [engine.encoder.pair(context, a)[1] for a in answers]
    assert all(len(c) > 1 for c in conts)
    shapes = []
    forward = engine.model.forward

    def recording(*args, **kw):
        shapes.append((tuple(kw["input_ids"].shape), tuple(kw["attention_mask"].shape)))
        return forward(*args, **kw)

    monkeypatch.setattr(engine.model, "forward", recording)
    got = engine.loglikelihood([(context, a) for a in answers])
    monkeypatch.undo()
    width = len(ctx) + sum(len(c) - 1 for c in conts)
    assert shapes == [((1, width), (1, 1, width, width))]
    for a, (lp, greedy) in zip(answers, got):
        want_lp, want_greedy = reference(engine, context, a)
        assert lp == pytest.approx(want_lp, abs=1e-4) and greedy == want_greedy


def test_one_token_answers_need_no_attention_mask(engine, monkeypatch):
    seen = []
    forward = engine.model.forward

    def recording(*args, **kw):
        seen.append(kw.get("attention_mask"))
        return forward(*args, **kw)

    requests = [(CONTEXTS[0], f" {letter}") for letter in "ABC"] + [(CONTEXTS[3], " A")]  # nothing in common
    assert all(len(engine.encoder.pair(*r)[1]) == 1 for r in requests)
    monkeypatch.setattr(engine.model, "forward", recording)
    engine.loglikelihood(requests)
    assert seen and all(m is None for m in seen)  # right-padded causal rows: the plain causal kernel


def test_too_long_requests_are_cut_as_lm_eval_does(engine):
    """(context + continuation)[-(max_length + 1):], scored on its own row; a neighbour that fits keeps the full
    context and still shares nothing with the cut one."""
    old = engine.max_length
    engine.max_length = 24
    try:
        context = "Question: Which gas do plants take in during the day when the sun shines?\nAnswer:"
        requests = [(context, " carbon dioxide"), (context[-30:], " carbon dioxide")]
        got = engine.loglikelihood(requests)
    finally:
        engine.max_length = old
    for (c, x), (lp, _) in zip(requests, got):
        ctx, cont = engine.encoder.pair(c, x)
        seq = (ctx + cont)[-25:]
        with torch.no_grad():
            logits = engine.model(input_ids=torch.tensor([seq[:-1]], device=engine.device)).logits[0]
        rows = torch.log_softmax(logits.double(), -1)[-len(cont):]
        want = rows.gather(-1, torch.tensor(cont, device=engine.device)[:, None]).sum().item()
        assert lp == pytest.approx(want, abs=1e-4)


def test_few_shot_contexts_share_their_prefix(engine, monkeypatch):
    """Contexts that start with the same solved examples run that start once (one row); each score still equals
    a separate forward over its own context + answer. A short common start is not shared (not worth it)."""
    shots = "".join(f"Question: what is {i} plus {i}?\nAnswer: {2 * i}\n\n" for i in range(12))
    contexts = [shots + f"Question: what is {q}?\nAnswer:" for q in ("one", "two and two", "the sun")]
    requests = [(c, x) for c in contexts for x in (" 2", " 4", " hot gas")]
    shapes = []
    forward = engine.model.forward

    def recording(*args, **kw):
        shapes.append(tuple(kw["input_ids"].shape))
        return forward(*args, **kw)

    monkeypatch.setattr(engine.model, "forward", recording)
    got = engine.loglikelihood(requests)
    separate = sum(len(engine.encode(c)) for c in contexts)
    assert len(shapes) == 1 and shapes[0][0] == 1 and shapes[0][1] < separate  # one row, the shots once
    shapes.clear()
    engine.loglikelihood([(f"Q{i}: what is {q}?\nAnswer:", " 4") for i, q in enumerate(("one", "two", "six"))])
    assert shapes == [(3, shapes[0][1])]  # three rows: "Q" in common is not worth a longer row
    monkeypatch.undo()
    for r, (lp, greedy) in zip(requests, got):
        want_lp, want_greedy = reference(engine, *r)
        assert lp == pytest.approx(want_lp, abs=1e-4) and greedy == want_greedy
