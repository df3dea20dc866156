"""The demo's text conditioning: an offline CLIP BPE tokenizer and a frozen, randomly initialised CLIP text tower.

The tokenizer has the 256 byte symbols and their ``</w>`` forms of ``models.text.build_byte_tokenizer`` plus BPE
merges that turn every caption word into ONE token (so the text tower sees words, not letters). The text tower
(``CLIPTextModelWithProjection``: hidden 64, 2 layers, 4 heads, MLP 128, projection 64) is never trained: its random
features, seeded, are distinct enough per word and position for Stages B and C to learn from.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import pairwise

from transformers import CLIPTextModelWithProjection, CLIPTokenizer

from models.text import BOS, EOS, build_byte_tokenizer, random_clip_text_model

TEXT_SEED = 0


def _bpe(word: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Standard BPE on one word's symbols: repeatedly merge the adjacent pair of lowest rank."""
    while len(word) > 1:
        pairs = [(ranks.get((a, b), 1 << 30), i) for i, (a, b) in enumerate(pairwise(word))]
        rank, i = min(pairs)
        if rank == 1 << 30:
            break
        word = word[:i] + [word[i] + word[i + 1]] + word[i + 2:]
    return word


def build_word_tokenizer(words: Sequence[str], model_max_length: int = 77) -> CLIPTokenizer:
    """A CLIP tokenizer whose merges make each of ``words`` (lower-case ASCII) a single ``word</w>`` token.

    Merges are added word by word: the word is first split with the merges so far, then its remaining pieces are
    joined left to right. New merges rank after all earlier ones, so words already done keep their single token;
    the loop re-checks every word until all are single tokens.
    """
    base = build_byte_tokenizer(model_max_length)
    vocab = dict(base.get_vocab())
    specials = {BOS: vocab.pop(BOS), EOS: vocab.pop(EOS)}
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    for _ in range(10):
        changed = False
        for word in words:
            pieces = _bpe(list(word[:-1]) + [word[-1] + "</w>"], ranks)
            while len(pieces) > 1:
                pair = (pieces[0], pieces[1])
                ranks[pair] = len(merges)
                merges.append(pair)
                vocab.setdefault(pair[0] + pair[1], len(vocab))
                pieces = [pair[0] + pair[1]] + pieces[2:]
                changed = True
        if not changed:
            break
    for name in specials:
        vocab[name] = len(vocab)
    tokenizer = CLIPTokenizer(
        vocab=vocab,
        merges=list(merges),
        model_max_length=model_max_length,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=EOS,
        unk_token=EOS,
    )
    for word in words:
        ids = tokenizer(word, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            raise RuntimeError(f"the demo tokenizer splits {word!r} into {len(ids)} tokens")
    return tokenizer


def build_text_model(tokenizer: CLIPTokenizer, seed: int = TEXT_SEED) -> CLIPTextModelWithProjection:
    """The frozen random text tower (hidden 64, 2 layers, 4 heads, MLP 128, projection 64), from ``seed``."""
    model = random_clip_text_model(tokenizer, width=64, layers=2, heads=4, mlp=128, seed=seed)
    return model.eval().requires_grad_(False)
