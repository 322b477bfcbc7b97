"""The engine interface shared by the `pt` (transformers) and `vllm` backends (engines.py picks one).

An engine does two things, each batched over a list of requests:
- `generate(prompts, sampling) -> list[str]`: a prompt is either a raw string (sent as is) or a list of chat messages
  (`[{"role", "content"}]`, rendered with the tokenizer's chat template plus the generation prompt);
- `loglikelihood([(context, continuation), ...]) -> list[(logprob, is_greedy)]`: the summed log-probability of the
  continuation tokens given the context, and whether greedy decoding would have produced exactly those tokens
  (lm-evaluation-harness semantics, including its context/continuation tokenization);
- `describe() -> dict`: what eval_result.json records about the engine (dtype, BOS rule, attention, ...).

Raw-text prompts follow lm-evaluation-harness's BOS rule (`--add_bos_token auto`): the tokenizer's default special
tokens (a Llama/Mistral/Gemma tokenizer prepends BOS, a Qwen one adds nothing), none when the text already starts
with the BOS text; `true`/`false` force it. Chat-template text never gets extra tokens: the template writes its own.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, Union

Message = dict  # {"role": "system"|"user"|"assistant", "content": str}
Prompt = Union[str, list[Message]]
BOS_RULES = ("auto", "true", "false")  # --add_bos_token: the tokenizer's default (lm-eval's rule), always, never


@dataclass(frozen=True)
class Sampling:
    """Decoding settings. temperature 0 means greedy (the default: evaluation must be reproducible)."""

    max_new_tokens: int = 512
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    repetition_penalty: float = 1.0
    stop: tuple[str, ...] = ()  # cut the text at the first of these (few-shot prompts run on past the answer)
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0


class Engine(Protocol):
    model_dir: Path
    max_length: int

    def describe(self) -> dict: ...

    def generate(self, prompts: Sequence[Prompt], sampling: Sampling, progress=None) -> list[str]: ...

    def loglikelihood(self, requests: Sequence[tuple[str, str]], progress=None) -> list[tuple[float, bool]]: ...

    def stream(self, messages: list[Message], sampling: Sampling) -> Iterator[str]: ...


def truncate_at_stop(text: str, stop: Sequence[str]) -> str:
    """The text before the earliest stop string (all of it when none occurs)."""
    cut = min((i for i in (text.find(s) for s in stop if s) if i >= 0), default=len(text))
    return text[:cut]


def split_context(context: str, continuation: str) -> tuple[str, str]:
    """Move trailing whitespace of the context onto the continuation, as lm-evaluation-harness does, so that
    "Answer: " + "A" and "Answer:" + " A" are scored the same way (BPE merges the space into the next token)."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        return context[:-n_spaces], context[-n_spaces:] + continuation
    return context, continuation


def render(tokenizer, prompt: Prompt) -> str:
    """The text a prompt becomes: raw strings as they are, messages through the tokenizer's chat template.
    A base model without a template gets plain "User: ..." lines ending in "Assistant:", which it can continue."""
    if isinstance(prompt, str):
        return prompt
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    return "".join(f"{m['role'].capitalize()}: {m['content']}\n" for m in prompt) + "Assistant:"

