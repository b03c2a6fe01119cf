"""Tiny tokenizers and random-init causal LMs built entirely in code.

Nothing here downloads anything: tests and CPU demos need a tokenizer and small models
without a hub. Two tokenizer flavours are offered:

* **word level** (:func:`build_word_tokenizer`): the vocabulary is learnt from texts (for
  example environment observations and expert actions). Words keep their leading space
  as part of the token (``" cabinet"``), so decoding is plain concatenation and any text
  whose pieces are all in the vocabulary round-trips exactly. Pieces not in the
  vocabulary become ``<unk>``.
* **char level** (:func:`build_char_tokenizer`): one token per character of a fixed
  alphabet (printable ASCII by default); every text over that alphabet round-trips.

Both share the same special tokens (:class:`SpecialTokens`): padding, unknown, end of
text, the ChatML markers ``<|im_start|>``/``<|im_end|>`` (``<|im_end|>`` is the eos, as in
Qwen), and the agent tags ``<think>``, ``</think>``, ``<action>``, ``</action>`` as single
(non-special) tokens so a model can emit a tag in one step.

Models come from :class:`TinyModelConfig` via :func:`build_tiny_causal_lm`, a few-layer
Llama or Qwen2 with random weights drawn from a given seed.
"""

from __future__ import annotations

import string
from collections.abc import Iterable
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    import torch

__all__ = [
    "SpecialTokens",
    "TinyModelConfig",
    "build_word_tokenizer",
    "build_char_tokenizer",
    "build_tiny_causal_lm",
    "WORD_PIECE_PATTERN",
]

# A word with its optional leading space, a single punctuation mark with its optional
# leading space, or one whitespace character. Keeping the leading space inside the
# token is what makes decoding a plain concatenation (exact round trip).
WORD_PIECE_PATTERN = r" ?[A-Za-z0-9_]+| ?[^\sA-Za-z0-9_]|\s"


@dataclass(frozen=True)
class SpecialTokens:
    """Special and reserved tokens shared by the word- and char-level tokenizers.

    ``eos`` is the end-of-turn marker the generator stops on. ``agent_tags`` are added
    as ordinary (non-special) tokens: they decode as text and are never skipped.
    """

    pad: str = "<pad>"
    unk: str = "<unk>"
    end_of_text: str = "<|endoftext|>"
    turn_start: str = "<|im_start|>"
    eos: str = "<|im_end|>"
    agent_tags: tuple[str, ...] = ("<think>", "</think>", "<action>", "</action>")

    def special_list(self) -> list[str]:
        """Special tokens in id order: pad is id 0, unk id 1, then the rest."""
        return [self.pad, self.unk, self.end_of_text, self.turn_start, self.eos]


# Words of the ChatML roles and of common prompt scaffolding, so that prompts built by
# the chat format never contain <unk> even when the training texts lack them.
DEFAULT_SEED_WORDS: tuple[str, ...] = ("system", "user", "assistant", "\n", " ", ".", ",", ":")


def _wrap_fast_tokenizer(raw_tokenizer, special_tokens: SpecialTokens):
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(
        tokenizer_object=raw_tokenizer,
        pad_token=special_tokens.pad,
        unk_token=special_tokens.unk,
        eos_token=special_tokens.eos,
        additional_special_tokens=[special_tokens.end_of_text, special_tokens.turn_start],
        # Decoding must be the exact inverse of encoding; the default clean-up would
        # remove spaces before punctuation and break turn-boundary exactness.
        clean_up_tokenization_spaces=False,
        padding_side="left",
    )
    return fast


def build_word_tokenizer(
    texts: Iterable[str],
    *,
    extra_words: Iterable[str] = (),
    min_frequency: int = 1,
    max_vocab_size: int = 50_000,
    special_tokens: SpecialTokens = SpecialTokens(),
):
    """Learn a word-level tokenizer from ``texts`` and wrap it as a HF fast tokenizer.

    Args:
        texts: training texts; every piece matched by :data:`WORD_PIECE_PATTERN` that
            occurs at least ``min_frequency`` times enters the vocabulary.
        extra_words: pieces added whatever their frequency (for example ``" north"``;
            note the leading space is part of a piece).
        min_frequency: minimum count for a piece from ``texts``.
        max_vocab_size: cap on the vocabulary, special tokens included.
        special_tokens: pad/unk/eos/chat markers and agent tags.

    Returns:
        ``transformers.PreTrainedTokenizerFast`` with ``pad_token_id == 0``, left padding,
        ``eos_token == special_tokens.eos``; ``decode(encode(text)) == text`` for any
        text made of in-vocabulary pieces (``add_special_tokens`` adds nothing).
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    raw = Tokenizer(models.WordLevel(unk_token=special_tokens.unk))
    raw.pre_tokenizer = pre_tokenizers.Split(Regex(WORD_PIECE_PATTERN), behavior="isolated")
    raw.decoder = decoders.Fuse()
    # Added before training so the tags are split out of the texts whole and never
    # learnt as "<", "action", ">" pieces.
    raw.add_tokens(list(special_tokens.agent_tags))
    trainer = trainers.WordLevelTrainer(
        vocab_size=max_vocab_size,
        min_frequency=min_frequency,
        special_tokens=special_tokens.special_list(),
        show_progress=False,
    )
    seed_texts = list(DEFAULT_SEED_WORDS) + list(extra_words)
    # min_frequency would drop seed words seen once, so repeat them.
    raw.train_from_iterator(_chain_texts(texts, seed_texts * max(1, min_frequency)), trainer)
    # Training rebuilds the model and drops tokens added before it; add the tags again
    # so each is one token with an id after the learnt vocabulary.
    raw.add_tokens(list(special_tokens.agent_tags))
    return _wrap_fast_tokenizer(raw, special_tokens)


def _chain_texts(texts: Iterable[str], more: list[str]):
    yield from texts
    yield from more


def build_char_tokenizer(
    alphabet: str = string.printable,
    *,
    special_tokens: SpecialTokens = SpecialTokens(),
):
    """A tokenizer with one token per character of ``alphabet``.

    Args:
        alphabet: characters of the vocabulary (default: printable ASCII, which includes
            space, tab and newline).
        special_tokens: pad/unk/eos/chat markers and agent tags (tags stay one token).

    Returns:
        ``transformers.PreTrainedTokenizerFast``; every text over ``alphabet`` encodes to
        one id per character (tags and markers aside) and decodes back exactly.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    vocab: dict[str, int] = {}
    for token in special_tokens.special_list():
        vocab[token] = len(vocab)
    for char in alphabet:
        if char not in vocab:
            vocab[char] = len(vocab)
    raw = Tokenizer(models.WordLevel(vocab=vocab, unk_token=special_tokens.unk))
    raw.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    raw.decoder = decoders.Fuse()
    raw.add_special_tokens(special_tokens.special_list())
    raw.add_tokens(list(special_tokens.agent_tags))
    return _wrap_fast_tokenizer(raw, special_tokens)


@dataclass
class TinyModelConfig:
    """Shape of a tiny random-init causal LM (also the trainer's ``model.student_tiny`` /
    ``model.teacher_tiny``, so plain types only: it round-trips through YAML).

    ``architecture`` is ``"llama"`` or ``"qwen2"``. ``vocab_size`` must be at least the
    tokenizer's ``len(tokenizer)``; :func:`build_tiny_causal_lm` fills it from the
    tokenizer when left ``None``. ``extra_config`` goes to the Hugging Face config as is.
    """

    architecture: Literal["llama", "qwen2"] = "llama"
    vocab_size: int | None = None
    hidden_size: int = 64
    intermediate_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    seed: int = 0
    extra_config: dict[str, Any] = field(default_factory=dict)

    def shape_problems(self) -> list[str]:
        """What makes this shape impossible to build, one line each (``[]``: none)."""
        sizes = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads")
        problems = [f"{name} must be >= 1, got {getattr(self, name)}" for name in (*sizes, "max_position_embeddings") if getattr(self, name) < 1]
        if not problems and self.hidden_size % self.num_attention_heads:
            problems.append(f"hidden_size must be a multiple of num_attention_heads ({self.num_attention_heads}), got {self.hidden_size}")
        if not problems and self.num_attention_heads % self.num_key_value_heads:
            problems.append(
                f"num_attention_heads must be a multiple of num_key_value_heads ({self.num_key_value_heads}), got {self.num_attention_heads}"
            )
        return problems


_ARCHITECTURES = ("llama", "qwen2")


def build_tiny_causal_lm(config: TinyModelConfig, tokenizer=None, *, dtype: torch.dtype | None = None):
    """Build a random-init causal LM from ``config``; the same seed gives the same weights.

    Args:
        config: model shape and seed.
        tokenizer: optional HF tokenizer; supplies ``vocab_size`` (when
            ``config.vocab_size`` is None) and the pad/eos ids written into the model's
            config and generation config.
        dtype: parameter dtype (``None``: float32; weights are drawn in float32, then cast).

    Returns:
        ``LlamaForCausalLM`` or ``Qwen2ForCausalLM`` in eval mode, dtype ``dtype``.
        Its forward maps ``input_ids (B, T) int64`` to ``logits (B, T, vocab_size)``.

    The global torch RNG is left untouched (weights are drawn inside ``fork_rng``).
    """
    if config.architecture not in _ARCHITECTURES:
        raise ValueError(
            f"architecture must be one of {_ARCHITECTURES}, got {config.architecture!r}"
        )
    vocab_size = config.vocab_size
    if vocab_size is None:
        if tokenizer is None:
            raise ValueError("TinyModelConfig.vocab_size is None and no tokenizer was given")
        vocab_size = len(tokenizer)
    elif tokenizer is not None and vocab_size < len(tokenizer):
        raise ValueError(
            f"vocab_size {vocab_size} is smaller than the tokenizer's {len(tokenizer)} tokens"
        )
    token_ids: dict = {}
    if tokenizer is not None:
        token_ids = {
            "pad_token_id": tokenizer.pad_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "bos_token_id": None,
        }
    # Every field but these is a Hugging Face config field of the same name.
    not_hf_fields = ("architecture", "vocab_size", "seed", "extra_config")
    shape = {f.name: getattr(config, f.name) for f in fields(config) if f.name not in not_hf_fields}
    common = dict(**shape, vocab_size=vocab_size, **token_ids, **config.extra_config)
    if config.architecture == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        hf_config, model_class = LlamaConfig(**common), LlamaForCausalLM
    else:
        from transformers import Qwen2Config, Qwen2ForCausalLM

        hf_config, model_class = Qwen2Config(**common), Qwen2ForCausalLM
    import torch  # here, not at the top: the trainer's config reads TinyModelConfig without torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        model = model_class(hf_config)
    model = model.to(dtype or torch.float32).eval()
    if tokenizer is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.generation_config.eos_token_id = tokenizer.eos_token_id
        model.generation_config.bos_token_id = None
    return model
