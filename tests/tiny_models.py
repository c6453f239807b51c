"""Tiny random Llama checkpoints for tests (real folders that vLLM and transformers load).

head_dim is 64 because the CPU attention backend supports only a fixed list of
head sizes (see the platform notes); the tokenizer is a small BPE trained on
the fly, so nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

CORPUS = [
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May.",
    "How many clips did Natalia sell altogether in April and May? 48 / 2 = 24. 48 + 24 = 72. #### 72",
    "The quick brown fox jumps over the lazy dog while the teacher writes a proof on the board.",
    "A student learns from traces: step one, add the numbers; step two, check the answer.",
    "Weng earns $12 an hour for babysitting. Yesterday, she just did 50 minutes of babysitting.",
] * 20

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def make_tokenizer(vocab_size: int = 384) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<unk>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def make_llama(
    out: Path,
    tokenizer: PreTrainedTokenizerFast,
    *,
    layers: int = 2,
    hidden: int = 128,
    heads: int = 2,
    kv_heads: int = 1,
    vocab_pad: int = 0,
    seed: int = 0,
    init_std: float = 0.08,
) -> Path:
    """Save a random Llama (head_dim 64) with ``tokenizer`` to ``out``; ``vocab_pad`` extra ids."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer) + vocab_pad,
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=hidden // heads,
        max_position_embeddings=1024,
        initializer_range=init_std,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config).to(torch.float32)
    model.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))
    return out


THINK_START, THINK_END = "<think>", "</think>"
# DeepSeek-R1's template opens the think block in the generation prompt; the model closes it.
THINKING_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    f"{{% if add_generation_prompt %}}<|im_start|>assistant\n{THINK_START}\n{{% endif %}}"
)


def make_thinking_tokenizer() -> PreTrainedTokenizerFast:
    """:func:`make_tokenizer` plus ``<think>`` and ``</think>``, with R1's generation prompt.

    Plain added tokens, not special ones: vLLM's ``deepseek_r1`` reasoning
    parser splits the decoded text, and decoding drops special tokens.
    """
    tok = make_tokenizer()
    tok.add_tokens([THINK_START, THINK_END])
    tok.chat_template = THINKING_CHAT_TEMPLATE
    return tok


def steer_to_close_thinking(folder: Path, tokenizer: PreTrainedTokenizerFast, *, alpha: float = 3.0,
                            beta: float = 1.25, seed: int = 0) -> None:
    """Rewrite the random Llama in ``folder`` so that it closes its think block often, and writes ASCII.

    A random model samples ``</think>`` about once in 386 tokens. Adding
    ``alpha * u`` (``u`` a fixed unit vector) to every embedding row puts
    ``u`` in the residual stream at every position; the ``</think>`` row of
    the LM head becomes ``beta * u``, so its logit sits a few nats above the
    rest whatever the context. The same ``u`` and values on teacher and proxy
    keep the PoE mix steered too: with the defaults, the tiny pair's PoE mix
    at gamma 0.65 gives ``</think>`` about 0.18 per token (measured with
    transformers over sampled continuations). ``<think>`` and the byte tokens
    that are no UTF-8 text on their own get ``-4 * beta * u``: never sampled
    in practice, so the released tokens' texts concatenate exactly to the
    decoded output.
    """
    model = LlamaForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    u = torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(seed), dtype=torch.float32)
    u /= u.norm()
    start, end = tokenizer.convert_tokens_to_ids([THINK_START, THINK_END])
    not_text = [i for i in range(len(tokenizer)) if "\ufffd" in tokenizer.decode([i])]
    with torch.no_grad():
        model.get_input_embeddings().weight += alpha * u
        head = model.get_output_embeddings().weight
        head[end] = beta * u
        head[[start, *not_text]] = -4 * beta * u
    model.save_pretrained(str(folder), safe_serialization=True)


def make_thinking_pair(root: Path) -> tuple[Path, Path]:
    """A teacher and proxy shaped like the tiny pair, on the thinking tokenizer, steered to close their think blocks."""
    tok = make_thinking_tokenizer()
    teacher = make_llama(root / "teacher", tok, layers=3, seed=0)
    proxy = make_llama(root / "proxy", tok, layers=1, seed=1, vocab_pad=40)
    for folder in (teacher, proxy):
        steer_to_close_thinking(folder, tok)
    return teacher, proxy


def make_early_exit(teacher: Path, out: Path, layers: int = 1, seed: int = 3) -> Path:
    """An early exit of ``teacher``: its first ``layers`` layers, a random final norm and a random untied head."""
    model = LlamaForCausalLM.from_pretrained(str(teacher), dtype=torch.float32)
    model.model.layers = model.model.layers[:layers]
    model.config.num_hidden_layers = layers
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        model.model.norm.weight.copy_(1 + 0.3 * torch.randn(model.model.norm.weight.shape, generator=gen))
        head = model.get_output_embeddings().weight
        head.copy_(0.08 * torch.randn(head.shape, generator=gen))
    model.save_pretrained(str(out), safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        if (teacher / name).exists():
            (out / name).write_bytes((teacher / name).read_bytes())
    return out
