"""Text -> token ids the way lm-evaluation-harness (0.4.x, `--model hf`) makes them, shared by both engines.

- BOS rule (`--add_bos_token`): `auto` keeps the tokenizer's default special tokens, as lm-eval does (a Llama 2/3,
  Mistral or Gemma tokenizer prepends BOS; Qwen's adds nothing), except that a text already starting with the BOS
  text gets none; `true` puts exactly one BOS first; `false` adds nothing.
- Text rendered by a chat template is encoded without special tokens: the template writes BOS itself (this is what
  `apply_chat_template(tokenize=True)` does).
- A (context, continuation) pair: trailing whitespace of the context moves onto the continuation; the pair is
  encoded as a whole and the tokens past the context's are the continuation (merges across the boundary kept).
  An empty context becomes the prefix token (BOS, else EOS), unless the continuation already starts with it.
"""

from __future__ import annotations

import sys

from megatune.evaluate.engine import BOS_RULES, Prompt, render, split_context
from megatune.evaluate.errors import UsageError


class Encoder:
    def __init__(self, tokenizer, add_bos: str = "auto") -> None:
        if add_bos not in BOS_RULES:
            raise UsageError(f"--add_bos_token {add_bos!r} is not one of: {', '.join(BOS_RULES)}")
        if add_bos == "true" and tokenizer.bos_token_id is None:
            raise UsageError("--add_bos_token true: this tokenizer defines no bos_token; use auto or false")
        self.tokenizer, self.add_bos = tokenizer, add_bos
        bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
        # lm-eval's prefix_token_id: the context of an empty context, and the "already starts with BOS" test
        self.prefix_id = bos if bos is not None else eos
        self.prefix_text = tokenizer.decode([self.prefix_id]) if self.prefix_id is not None else None

    def raw(self, text: str) -> list[int]:
        """A raw-text prompt under the BOS rule."""
        if self.add_bos == "false":
            return self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if self.add_bos == "true":
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            bos = self.tokenizer.bos_token_id
            return ids if ids[:1] == [bos] else [bos, *ids]
        special = not (self.prefix_text and text.startswith(self.prefix_text))
        return self.tokenizer(text, add_special_tokens=special)["input_ids"]

    def plain(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def prompt(self, prompt: Prompt) -> list[int]:
        """A generation prompt: chat messages through the template (no extra tokens), raw text by the BOS rule.
        Messages on a tokenizer without a template are rendered as plain text, so they are raw text too."""
        text = render(self.tokenizer, prompt)
        templated = not isinstance(prompt, str) and bool(getattr(self.tokenizer, "chat_template", None))
        return self.plain(text) if templated else self.raw(text)

    def pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """(context tokens, continuation tokens) as lm-eval's `loglikelihood` / `_encode_pair` make them."""
        if not context:
            cont = self.plain(continuation)
            if cont[:1] == [self.prefix_id]:
                return cont[:1], cont[1:]
            return [self.prefix_id], cont
        context, continuation = split_context(context, continuation)
        whole, ctx = self.raw(context + continuation), self.raw(context)
        return ctx, whole[len(ctx):]

    def describe(self) -> dict:
        probe = self.raw("a")
        bos = self.tokenizer.bos_token_id
        return {"add_bos_token": self.add_bos, "bos_token": self.tokenizer.bos_token,
                "raw_text_starts_with_bos": bos is not None and probe[:1] == [bos],
                "rule": "lm-evaluation-harness: tokenizer default special tokens" if self.add_bos == "auto"
                else f"forced {self.add_bos}"}


def notice_truncated(count: int, total: int, limit: int, why: str) -> None:
    """One line on stderr when prompts were cut from the left to fit the model's positions (never silently)."""
    if count:
        print(f"notice: {count} of {total} prompts are longer than {limit} tokens ({why}); they were cut from the "
              f"left, keeping their last {limit} tokens", file=sys.stderr, flush=True)
