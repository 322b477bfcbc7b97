"""A real, small HF tokenizer for tests: byte-level BPE trained on a built-in corpus, ChatML chat template.

Byte-level BPE covers any text (Chinese included) with no unknown token, like the Qwen/Llama 3 tokenizers it
stands in for. Training is deterministic, so every test process sees the same ids. The vocabulary is
deliberately not a multiple of 128 so that Megatron's vocab padding is always exercised.
"""

from __future__ import annotations

from pathlib import Path

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

# Qwen2-style ChatML without the default system prompt. No `{% generation %}` markers on purpose: real
# checkpoints rarely have them, so loss masks must be derived the robust way.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_CORPUS = Path(__file__).with_name("corpus.txt")


def build_tokenizer(vocab_size: int = 1000):
    """Train the tiny tokenizer and wrap it as a `transformers.PreTrainedTokenizerFast`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    lines = _CORPUS.read_text(encoding="utf-8").splitlines()
    tok.train_from_iterator(lines * 4, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=CHAT_TEMPLATE,
        model_max_length=4096,
        clean_up_tokenization_spaces=False,
    )
