"""The `vllm` engine (optional extra `megatune-evaluate[vllm]`, CUDA machines).

vLLM schedules and batches by itself, so requests go in as one list. Chat prompts are rendered with the same
tokenizer chat template as the pt engine, and prompts are passed as token ids, so both engines see identical inputs.
loglikelihood asks for `prompt_logprobs=1`: vLLM then returns, for every prompt position, the log-prob of the actual
token together with its rank, and rank 1 at every continuation position means greedy decoding would produce it.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

from megatune.evaluate.engine import Message, Prompt, Sampling, render, truncate_at_stop
from megatune.evaluate.errors import UsageError
from megatune.evaluate.tokens import Encoder, notice_truncated


class VllmEngine:
    def __init__(self, model_dir: str | Path, *, dtype: str | None = None, tensor_parallel_size: int = 1,
                 max_length: int | None = None, gpu_memory_utilization: float = 0.9, seed: int = 0,
                 add_bos: str = "auto", **_) -> None:
        from vllm import LLM

        self.model_dir = Path(model_dir)
        if (self.model_dir / "adapter_config.json").is_file():
            raise UsageError(f"{self.model_dir} is a LoRA adapter dir; the vllm backend needs merged weights: run "
                            f"`megatune export --ckpt_dir RUN --to_hf true` or use --infer_backend pt")
        self.llm = LLM(model=str(self.model_dir), tensor_parallel_size=tensor_parallel_size,
                       dtype=dtype or "auto", max_model_len=max_length, seed=seed,
                       gpu_memory_utilization=gpu_memory_utilization)
        self.tokenizer = self.llm.get_tokenizer()
        self.max_length = self.llm.llm_engine.model_config.max_model_len
        self.encoder = Encoder(self.tokenizer, add_bos)
        self.dtype = dtype or "auto"

    def describe(self) -> dict:
        return {"engine": "vllm", "dtype": self.dtype, "max_length": self.max_length, **self.encoder.describe()}

    def encode(self, text: str) -> list[int]:
        return self.encoder.raw(text)

    def render(self, prompt: Prompt) -> str:
        return render(self.tokenizer, prompt)

    def _params(self, sampling: Sampling):
        from vllm import SamplingParams

        if sampling.greedy:
            return SamplingParams(max_tokens=sampling.max_new_tokens, temperature=0.0,
                                  repetition_penalty=sampling.repetition_penalty)
        return SamplingParams(max_tokens=sampling.max_new_tokens, temperature=sampling.temperature,
                              top_p=sampling.top_p, top_k=sampling.top_k or -1, seed=sampling.seed,
                              repetition_penalty=sampling.repetition_penalty)

    def _token_prompts(self, ids: Sequence[Sequence[int]]) -> list:
        from vllm.inputs import TokensPrompt

        return [TokensPrompt(prompt_token_ids=list(x)) for x in ids]

    def generate(self, prompts: Sequence[Prompt], sampling: Sampling = Sampling(), progress=None) -> list[str]:
        room = max(self.max_length - sampling.max_new_tokens, self.max_length // 2)
        ids = [self.encoder.prompt(p) for p in prompts]
        notice_truncated(sum(len(x) > room for x in ids), len(ids), room,
                         f"max_model_len {self.max_length} less max_new_tokens {sampling.max_new_tokens}")
        ids = [x[-room:] for x in ids]
        outputs = self.llm.generate(self._token_prompts(ids), self._params(sampling), use_tqdm=False)
        if progress is not None:
            progress.update(len(prompts))
        return [truncate_at_stop(o.outputs[0].text, sampling.stop) for o in outputs]

    def stream(self, messages: list[Message], sampling: Sampling = Sampling()) -> Iterator[str]:
        # the offline LLM class has no token streaming; the REPL prints the whole reply at once
        yield self.generate([messages], sampling)[0]

    def loglikelihood(self, requests: Sequence[tuple[str, str]], progress=None) -> list[tuple[float, bool]]:
        from vllm import SamplingParams

        seqs, cont_lens, cut = [], [], 0
        for context, continuation in requests:
            ctx, cont = self.encoder.pair(context, continuation)
            cut += len(ctx) + len(cont) > self.max_length
            seq = (ctx + cont)[-self.max_length:]
            seqs.append(seq)
            cont_lens.append(min(len(cont), len(seq) - 1))
        notice_truncated(cut, len(requests), self.max_length, "max_model_len, context + continuation")
        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=1)
        outputs = self.llm.generate(self._token_prompts(seqs), params, use_tqdm=False)
        results = []
        for seq, n, out in zip(seqs, cont_lens, outputs):
            total, greedy = 0.0, True
            for pos in range(len(seq) - n, len(seq)):
                entry = out.prompt_logprobs[pos][seq[pos]]  # position 0 is None: nothing predicts the first token
                total += entry.logprob
                greedy = greedy and entry.rank == 1
            results.append((total, greedy))
        if progress is not None:
            progress.update(len(requests))
        return results
