"""The `pt` engine: plain transformers, on any machine.

Design choices:
- Scoring (loglikelihood) runs each context once with all its continuations as branches, contexts with a long common
  start (few-shot prompts) share it, and rows are batched by length, right-padded, computing only the logits of the
  scored positions (scoring.py has the layout and the cost rule).
- Generation: prompts sorted by token length (longest first, so an out-of-memory shows up in the first batch),
  LEFT-padded batches so every row ends at the same column and generation appends there; position ids come from
  the attention mask, so a padded row sees the same positions as alone. Results come back in the caller's order.
- Tokens follow lm-evaluation-harness (tokens.py): its BOS rule for raw text, its context/continuation split.
- bf16 on GPU, fp32 on CPU (CPU bf16 matmuls are slow and the tests compare against fp32 forward passes).
- A prompt longer than the model's positions is cut from the left, and a notice on stderr says so.
"""

from __future__ import annotations

import importlib.util
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from megatune.evaluate import scoring
from megatune.evaluate.engine import Message, Prompt, Sampling, render, truncate_at_stop
from megatune.evaluate.errors import EvalError, UsageError
from megatune.evaluate.tokens import Encoder, notice_truncated

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


class PtEngine:
    def __init__(self, model_dir: str | Path, *, dtype: str | None = None, device: str | None = None,
                 batch_size: int = 16, max_length: int | None = None, add_bos: str = "auto",
                 max_batch_tokens: int = 32768) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.model_dir = Path(model_dir)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if dtype in (None, "auto"):
            dtype = "bfloat16" if self.device.type == "cuda" else "float32"
        if dtype not in DTYPES:
            raise UsageError(f"--torch_dtype {dtype!r} is not one of: {', '.join(DTYPES)}")
        if (self.model_dir / "adapter_config.json").is_file() and importlib.util.find_spec("peft") is None:
            raise UsageError(f"{self.model_dir} is a LoRA adapter dir: loading it on its base model needs peft "
                            f"(pip install peft), or export merged weights with `megatune export --to_hf true`")
        try:  # an adapter dir loads through transformers' peft integration (base_model_name_or_path + adapter)
            self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
            self.model = AutoModelForCausalLM.from_pretrained(self.model_dir, dtype=DTYPES[dtype])
        except (OSError, ValueError) as e:  # missing weights/tokenizer files, unknown architecture
            raise EvalError(f"cannot load {self.model_dir}: {str(e).strip().splitlines()[0]}") from e
        self.model.to(self.device).eval()
        self.dtype = dtype
        self.batch_size, self.max_batch_tokens = batch_size, max_batch_tokens
        self.encoder = Encoder(self.tokenizer, add_bos)
        try:  # how much a longer row costs in attention: decides which contexts share a row (scoring.py)
            self.alpha = scoring.attention_weight(self.model.config.get_text_config())
        except AttributeError:  # an unusual config: share only what is surely cheaper
            self.alpha = 0.01
        self.max_length = max_length or getattr(self.model.config, "max_position_embeddings", 2048)
        self.eos_ids = _eos_ids(self.tokenizer, self.model.generation_config)
        tok = self.tokenizer
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else self.eos_ids[0]

    def describe(self) -> dict:
        return {"engine": "pt", "dtype": self.dtype, "device": str(self.device), "max_length": self.max_length,
                "attention": getattr(self.model.config, "_attn_implementation", None),
                "batch_size": self.batch_size,
                "scoring": "each context once, continuations as branches, long common prefixes shared",
                **self.encoder.describe()}

    # ---------------------------------------------------------------- tokenization
    def encode(self, text: str) -> list[int]:
        """A raw-text prompt's tokens under the BOS rule (lm-evaluation-harness's)."""
        return self.encoder.raw(text)

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

    def _prompt_ids(self, prompts: Sequence[Prompt], sampling: Sampling) -> list[list[int]]:
        ids = [self.encoder.prompt(p) for p in prompts]
        # keep the end (that is where the question is); never cut to almost nothing because max_new_tokens is
        # close to the context size: generation may run past it, the prompt matters more
        room = max(self.max_length - sampling.max_new_tokens, self.max_length // 2)
        notice_truncated(sum(len(x) > room for x in ids), len(ids), room,
                         f"max_model_len {self.max_length} less max_new_tokens {sampling.max_new_tokens}")
        return [x[-room:] for x in ids]

    def _decode_new(self, row: torch.Tensor) -> str:
        row = row.tolist()
        cut = next((i for i, t in enumerate(row) if t in self.eos_ids), len(row))
        return self.tokenizer.decode(row[:cut], skip_special_tokens=True)

    @torch.inference_mode()
    def generate(self, prompts: Sequence[Prompt], sampling: Sampling = Sampling(), progress=None) -> list[str]:
        ids = self._prompt_ids(prompts, sampling)
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

        input_ids, mask = self._left_pad(self._prompt_ids([messages], sampling))
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
    def loglikelihood(self, requests: Sequence[tuple[str, str]], progress=None) -> list[tuple[float, bool]]:
        encoded = [self.encoder.pair(c, x) for c, x in requests]
        try:
            rows, cut = scoring.build_rows(encoded, self.max_length, self.alpha)
        except ValueError as e:
            raise EvalError(f"loglikelihood: {e}") from None
        notice_truncated(cut, len(requests), self.max_length + 1, "the model's positions, context + continuation")
        results: list[tuple[float, bool]] = [(0.0, False)] * len(requests)
        for batch in scoring.batches(rows, self.batch_size, self.max_batch_tokens):
            for i, total, greedy in scoring.score_batch(self.model, batch, self.pad_id, self.device):
                results[i] = (total, greedy)
            if progress is not None:
                progress.update(sum(len(c.conts) for r in batch for c in r.contexts))
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
        raise EvalError("the tokenizer and generation_config.json define no eos token; set eos_token in tokenizer_config.json")
    return ids
