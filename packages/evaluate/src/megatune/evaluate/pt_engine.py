"""The `pt` engine: plain transformers, on any machine.

Design choices:
- Requests are sorted by token length (longest first, so an out-of-memory shows up in the first batch) and run in
  batches; results come back in the caller's order.
- Batches are LEFT-padded for both generation and scoring, so every row ends at the same column: generation appends
  there, and scoring only needs the logits of the last few columns (`logits_to_keep`), never the full (B, T, V)
  tensor. Position ids are computed from the attention mask, so a padded row sees the same positions as alone.
- loglikelihood de-duplicates identical model inputs: the four answers " A"/" B"/" C"/" D" to one question share
  the input `context` (only the scored last token differs), so they cost one row, not four.
- bf16 on GPU, fp32 on CPU (CPU bf16 matmuls are slow and the tests compare against fp32 forward passes).
"""

from __future__ import annotations

import importlib.util
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from megatune.evaluate.engine import Message, Prompt, Sampling, UserError, render, split_context, truncate_at_stop

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


class PtEngine:
    def __init__(self, model_dir: str | Path, *, dtype: str | None = None, device: str | None = None,
                 batch_size: int = 16, max_length: int | None = None) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.model_dir = Path(model_dir)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if dtype in (None, "auto"):
            dtype = "bfloat16" if self.device.type == "cuda" else "float32"
        if dtype not in DTYPES:
            raise UserError(f"--torch_dtype {dtype!r} is not one of: {', '.join(DTYPES)}")
        if (self.model_dir / "adapter_config.json").is_file() and importlib.util.find_spec("peft") is None:
            raise UserError(f"{self.model_dir} is a LoRA adapter dir: loading it on its base model needs peft "
                            f"(pip install peft), or export merged weights with `megatune export --to_hf true`")
        try:  # an adapter dir loads through transformers' peft integration (base_model_name_or_path + adapter)
            self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
            self.model = AutoModelForCausalLM.from_pretrained(self.model_dir, dtype=DTYPES[dtype])
        except (OSError, ValueError) as e:  # missing weights/tokenizer files, unknown architecture
            raise UserError(f"cannot load {self.model_dir}: {str(e).strip().splitlines()[0]}") from e
        self.model.to(self.device).eval()
        self.batch_size = batch_size
        self.max_length = max_length or getattr(self.model.config, "max_position_embeddings", 2048)
        self.eos_ids = _eos_ids(self.tokenizer, self.model.generation_config)
        tok = self.tokenizer
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else self.eos_ids[0]
        # a context must hold at least one token; lm-evaluation-harness uses end-of-text for an empty one
        self.prefix_id = tok.bos_token_id if tok.bos_token_id is not None else self.eos_ids[0]

    # ---------------------------------------------------------------- tokenization
    def encode(self, text: str) -> list[int]:
        # no special tokens: chat templates already write BOS where the model wants it, and raw-text prompts
        # follow lm-evaluation-harness, which does not add them either
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def render(self, prompt: Prompt) -> str:
        return render(self.tokenizer, prompt)

    def _left_pad(self, rows: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
            mask[i, width - len(r):] = 1
        return ids.to(self.device), mask.to(self.device)

    # ---------------------------------------------------------------- generation
    def _generation_kwargs(self, sampling: Sampling) -> dict:
        kw = dict(max_new_tokens=sampling.max_new_tokens, eos_token_id=self.eos_ids, pad_token_id=self.pad_id,
                  repetition_penalty=sampling.repetition_penalty)
        if sampling.greedy:
            # explicit, so a generation_config.json that turns sampling on cannot make evaluation random
            kw.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        else:
            kw.update(do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p,
                      top_k=sampling.top_k or None)
            if sampling.seed is not None:
                torch.manual_seed(sampling.seed)
        return kw

    def _prompt_ids(self, prompt: Prompt, sampling: Sampling) -> list[int]:
        ids = self.encode(self.render(prompt))
        # keep the end (that is where the question is); never cut to almost nothing because max_new_tokens is
        # close to the context size: generation may run past it, the prompt matters more
        room = max(self.max_length - sampling.max_new_tokens, self.max_length // 2)
        return ids[-room:]

    def _decode_new(self, row: torch.Tensor) -> str:
        row = row.tolist()
        cut = next((i for i, t in enumerate(row) if t in self.eos_ids), len(row))
        return self.tokenizer.decode(row[:cut], skip_special_tokens=True)

    @torch.inference_mode()
    def generate(self, prompts: Sequence[Prompt], sampling: Sampling = Sampling(), progress=None) -> list[str]:
        ids = [self._prompt_ids(p, sampling) for p in prompts]
        order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
        texts: list[str] = [""] * len(ids)
        kw = self._generation_kwargs(sampling)
        for start in range(0, len(order), self.batch_size):
            idx = order[start:start + self.batch_size]
            input_ids, mask = self._left_pad([ids[i] for i in idx])
            out = self.model.generate(input_ids=input_ids, attention_mask=mask, **kw)  # (B, T + new)
            for i, row in zip(idx, out[:, input_ids.shape[1]:]):
                texts[i] = truncate_at_stop(self._decode_new(row), sampling.stop)
            if progress is not None:
                progress.update(len(idx))
        return texts

    def stream(self, messages: list[Message], sampling: Sampling = Sampling()) -> Iterator[str]:
        """Yield the reply piece by piece as it is decoded (generation runs in a background thread)."""
        from transformers import TextIteratorStreamer

        input_ids, mask = self._left_pad([self._prompt_ids(messages, sampling)])
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        kw = self._generation_kwargs(sampling)
        errors: list[BaseException] = []

        def run() -> None:
            try:
                with torch.inference_mode():
                    self.model.generate(input_ids=input_ids, attention_mask=mask, streamer=streamer, **kw)
            except BaseException as e:  # surfaced in the caller's thread below
                errors.append(e)
                streamer.end()

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        yield from streamer
        thread.join()
        if errors:
            raise errors[0]

    # ---------------------------------------------------------------- scoring
    def _score_inputs(self, context: str, continuation: str) -> tuple[tuple[int, ...], list[int]]:
        """(model input, continuation tokens) the lm-evaluation-harness way: tokenize context+continuation as a
        whole (so merges across the boundary are kept) and call the tokens past the context's the continuation."""
        context, continuation = split_context(context, continuation)
        if context:
            whole, ctx = self.encode(context + continuation), self.encode(context)
            cont = whole[len(ctx):]
        else:
            ctx, cont = [self.prefix_id], self.encode(continuation)
        if not cont:
            raise ValueError(f"continuation {continuation!r} encodes to no tokens (context ends {context[-40:]!r})")
        seq = (ctx + cont)[-(self.max_length + 1):]
        return tuple(seq[:-1]), cont[-(len(seq) - 1):]

    @torch.inference_mode()
    def loglikelihood(self, requests: Sequence[tuple[str, str]], progress=None) -> list[tuple[float, bool]]:
        encoded = [self._score_inputs(c, x) for c, x in requests]
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, (inp, _) in enumerate(encoded):
            groups.setdefault(inp, []).append(i)
        inputs = sorted(groups, key=lambda k: -len(k))
        results: list[tuple[float, bool]] = [(0.0, False)] * len(encoded)
        for start in range(0, len(inputs), self.batch_size):
            batch = inputs[start:start + self.batch_size]
            keep = max(len(encoded[i][1]) for inp in batch for i in groups[inp])
            input_ids, mask = self._left_pad(batch)
            position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
            logits = self.model(input_ids=input_ids, attention_mask=mask, position_ids=position_ids,
                                logits_to_keep=keep).logits  # (B, keep, V)
            logprobs = torch.log_softmax(logits.float(), dim=-1)
            for b, inp in enumerate(batch):
                for i in groups[inp]:
                    cont = torch.tensor(encoded[i][1], device=self.device)
                    lp = logprobs[b, keep - len(cont):]  # (L, V): row t predicts continuation token t
                    total = lp.gather(-1, cont[:, None]).sum().item()
                    results[i] = (total, bool((lp.argmax(-1) == cont).all()))
                if progress is not None:
                    progress.update(len(groups[inp]))
        return results


def _eos_ids(tokenizer, generation_config) -> list[int]:
    """Every id that ends a reply: the tokenizer's, generation_config's (an int or a list), and ChatML's <|im_end|>
    when the vocabulary has it (chat-tuned checkpoints often keep <|endoftext|> as the tokenizer's eos)."""
    ids: list[int] = []
    gc = getattr(generation_config, "eos_token_id", None)
    for i in [tokenizer.eos_token_id, *(gc if isinstance(gc, list) else [gc])]:
        if i is not None and i not in ids:
            ids.append(int(i))
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>") if "<|im_end|>" in tokenizer.get_vocab() else None
    if im_end is not None and im_end not in ids:
        ids.append(im_end)
    if not ids:
        raise UserError("the tokenizer and generation_config.json define no eos token; set eos_token in tokenizer_config.json")
    return ids
