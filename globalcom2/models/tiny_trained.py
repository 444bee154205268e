"""The architecture and tokenizer of ``tiny-trained``: the tiny LLaVA-NeXT that ``make train-tiny`` trains.

Same geometry as :mod:`globalcom2.models.tiny` (llava-v1.6: CLIP 336 px / patch 14, the five grid
pinpoints, unpadding, row separators, feature layer -2, [CLS] dropped), so every count and index a
compression method computes is the one it computes on the 7B/13B checkpoints. Three things differ from
the random ``tiny`` model, each because a model that must *learn* needs it and the exactness tests do not:

* **Weights start at std 0.02** (transformers' default), not 0.2: 0.2 makes attention far from uniform,
  which the exactness tests want and which stalls training.
* **The language model is 128 wide** (the vision tower stays 64): the retrieval the questions need
  (find the one triangle among ~2,000 visual tokens, read its colour) did not emerge at width 64 within
  the CPU budget.
* **A BPE tokenizer learnt on the demo's own prompts** (ByteLevel, so every string still encodes and
  decodes exactly): each word of a question and each answer is one token ("Ġtriangle", "Ġyellow"),
  instead of one token per byte. A byte-level model must first learn to assemble "t-r-i-a-n-g-l-e" into a
  word before it can look for the triangle; with words as tokens, a head can match the shape word
  directly.

The checkpoint itself lives in ``globalcom2/models/checkpoints/tiny-trained`` (committed, with its
``training_record.json``) and is loaded by name, ``load_llava_next("tiny-trained")``, through the same
loader and ``from_pretrained`` path as the real checkpoints.
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlavaNextConfig, PreTrainedTokenizerFast

from globalcom2.models import tiny
from globalcom2.models.base import TINY_TRAINED
from globalcom2.models.tiny import llama_style_tokenizer, llava_v16_config

CHECKPOINT_DIR = Path(__file__).resolve().parent / "checkpoints" / TINY_TRAINED

# The random tiny model's tower with a wider MLP, and its LLM at twice the width (GQA 4/2 heads kept).
VISION = {**tiny.VISION, "intermediate_size": 256}
TEXT = {**tiny.TEXT, "hidden_size": 128, "intermediate_size": 344}
INITIALIZER_RANGE = 0.02
SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>")
# Ample for the demo vocabulary (the trainer stops at ~460: every word merged, nothing left to merge).
TOKENIZER_VOCAB_LIMIT = 2000


def train_tokenizer(corpus: list[str]) -> PreTrainedTokenizerFast:
    """A ByteLevel BPE tokenizer learnt on ``corpus`` (deterministic for a given corpus and order).

    ``<s>`` is prepended like LLaMA's tokenizer does; ``<image>`` is a special token; padding is on the
    left, as batched generation needs.
    """
    core = Tokenizer(models.BPE(unk_token=None))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB_LIMIT,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(corpus, trainer=trainer)
    return llama_style_tokenizer(core)


def tiny_trained_config(tokenizer: PreTrainedTokenizerFast) -> LlavaNextConfig:
    """LLaVA-NeXT config with llava-v1.6 geometry and the ``tiny-trained`` widths."""
    return llava_v16_config(tokenizer, VISION, TEXT, INITIALIZER_RANGE)
