"""The `vllm` engine (optional extra `megatune-evaluate[vllm]`, CUDA machines).

vLLM schedules and batches by itself, so requests go in as one list. Chat prompts are rendered with the same
tokenizer chat template as the pt engine, and prompts are passed as token ids, so both engines see identical inputs.
loglikelihood asks for `prompt_logprobs=1`: vLLM then returns, for every prompt position, the log-prob of the actual
token together with its rank, and rank 1 at every continuation position means greedy decoding would produce it.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

from megatune.evaluate.engine import Message, Prompt, Sampling, render, split_context, truncate_at_stop


class VllmEngine:
    def __init__(self, model_dir: str | Path, *, dtype: str | None = None, tensor_parallel_size: int = 1,
                 max_length: int | None = None, gpu_memory_utilization: float = 0.9, seed: int = 0, **_) -> None:
        from vllm import LLM

        self.model_dir = Path(model_dir)
        if (self.model_dir / "adapter_config.json").is_file():
            from megatune.evaluate.engine import UserError

            raise UserError(f"{self.model_dir} is a LoRA adapter dir; the vllm backend needs merged weights: run "
                            f"`megatune export --ckpt_dir RUN --to_hf true` or use --infer_backend pt")
        self.llm = LLM(model=str(self.model_dir), tensor_parallel_size=tensor_parallel_size,
                       dtype=dtype or "auto", max_model_len=max_length, seed=seed,
                       gpu_memory_utilization=gpu_memory_utilization)
        self.tokenizer = self.llm.get_tokenizer()
        self.max_length = self.llm.llm_engine.model_config.max_model_len

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

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
        ids = [self.encode(self.render(p))[-room:] for p in prompts]
        outputs = self.llm.generate(self._token_prompts(ids), self._params(sampling), use_tqdm=False)
        if progress is not None:
            progress.update(len(prompts))
        return [truncate_at_stop(o.outputs[0].text, sampling.stop) for o in outputs]

    def stream(self, messages: list[Message], sampling: Sampling = Sampling()) -> Iterator[str]:
        # the offline LLM class has no token streaming; the REPL prints the whole reply at once
        yield self.generate([messages], sampling)[0]

    def loglikelihood(self, requests: Sequence[tuple[str, str]], progress=None) -> list[tuple[float, bool]]:
        from vllm import SamplingParams

        seqs, cont_lens = [], []
        for context, continuation in requests:
            context, continuation = split_context(context, continuation)
            ctx = self.encode(context) if context else [self.tokenizer.bos_token_id or self.tokenizer.eos_token_id]
            cont = self.encode(context + continuation)[len(ctx):] if context else self.encode(continuation)
            seq = (ctx + cont)[-self.max_length:]
            seqs.append(seq)
            cont_lens.append(min(len(cont), len(seq) - 1))
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
