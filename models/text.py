"""Prompt -> CLIP text conditioning for Stage C and Stage B (stable_cascade_spec.md §9).

The only module that imports transformers. Official semantics: the prompt is padded to 77 tokens
with truncation, the attention mask is passed to the text model, ``clip_text`` is
``hidden_states[-1]`` (the last transformer layer *before* the final LayerNorm, all 77 positions)
and ``clip_text_pooled`` is the projected ``text_embeds`` as [B, 1, P]. Embeddings of the empty
prompt, the unconditional input of both stages, are computed once when the encoder is built.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer

BOS, EOS = "<|startoftext|>", "<|endoftext|>"


@dataclass
class TextEmbeddings:
    """The conditioning of B prompts (L = 77 tokens).

    clip_text: [B, L, D] float32; clip_text_pooled: [B, 1, P] float32; truncated: one flag per
    prompt, True when it had more than L tokens and was cut.
    """

    clip_text: Tensor
    clip_text_pooled: Tensor
    truncated: list[bool]


def _byte_symbols() -> list[str]:
    """The 256 printable stand-ins for bytes used by byte-level BPE, in byte order.

    Printable Latin-1 bytes map to themselves, the others to code points from 256 up, so any UTF-8
    text is representable.
    """
    keep = set(range(ord("!"), ord("~") + 1)) | set(range(0xA1, 0xAD)) | set(range(0xAE, 0x100))
    symbols, extra = [], 0
    for byte in range(256):
        if byte in keep:
            symbols.append(chr(byte))
        else:
            symbols.append(chr(256 + extra))
            extra += 1
    return symbols


def build_byte_tokenizer(model_max_length: int = 77) -> CLIPTokenizer:
    """An offline CLIP tokenizer without merges: a word becomes its bytes, the last with ``</w>``.

    Vocabulary (514 ids): 256 byte symbols, their 256 ``</w>`` forms, BOS 512, EOS 513 (also pad and
    unk, as the real CLIP tokenizer pads with its end token).
    """
    symbols = _byte_symbols()
    vocab = {s: i for i, s in enumerate(symbols)}
    vocab.update({s + "</w>": i + 256 for i, s in enumerate(symbols)})
    vocab[BOS], vocab[EOS] = 512, 513
    return CLIPTokenizer(
        vocab=vocab,
        merges=[],
        model_max_length=model_max_length,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=EOS,
        unk_token=EOS,
    )


def random_clip_text_model(
    tokenizer: CLIPTokenizer,
    *,
    width: int,
    layers: int,
    heads: int,
    mlp: int,
    seed: int,
    hidden_act: str = "quick_gelu",
) -> CLIPTextModelWithProjection:
    """A randomly initialised CLIP text tower for ``tokenizer`` (its vocabulary and special ids), 77
    positions, projection as wide as the tower. The same ``seed`` gives the same weights; transformers
    initialises from the global RNG, which is forked, so the caller's RNG state is left alone."""
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=width,
        projection_dim=width,
        intermediate_size=mlp,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=77,
        hidden_act=hidden_act,
        layer_norm_eps=1e-5,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return CLIPTextModelWithProjection(config)


class TextEncoder:
    """CLIP tokenizer + ``CLIPTextModelWithProjection``; ``encode(prompts)`` -> TextEmbeddings.

    Not thread-safe (like the pipeline that owns it). The model runs in ``dtype`` on ``device``; the
    returned embeddings are float32.
    """

    def __init__(
        self,
        tokenizer: CLIPTokenizer,
        model: CLIPTextModelWithProjection,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.tokenizer = tokenizer
        self.model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
        self.device = torch.device(device)
        # A tokenizer folder without tokenizer_config.json reports a huge model_max_length; the
        # position table is the real bound (77 for every CLIP text tower).
        self.max_length = min(tokenizer.model_max_length, model.config.max_position_embeddings)
        self.empty = self._run([""])

    @property
    def dim(self) -> int:
        """D, the width of ``clip_text``."""
        return int(self.model.config.hidden_size)

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> TextEncoder:
        """Load from a snapshot root with ``text_encoder/`` + ``tokenizer/`` subfolders, or from one
        local folder holding both the model (config.json + weights) and the tokenizer files. Never
        touches the network."""
        root = Path(path)
        model_dir = root / "text_encoder" if (root / "text_encoder").is_dir() else root
        tok_dir = root / "tokenizer" if (root / "tokenizer").is_dir() else root
        if not (model_dir / "config.json").is_file():
            raise FileNotFoundError(f"no CLIP text encoder (config.json) in {model_dir}")
        tokenizer = CLIPTokenizer.from_pretrained(tok_dir, local_files_only=True)
        model = CLIPTextModelWithProjection.from_pretrained(
            model_dir, local_files_only=True, dtype=dtype
        )
        return cls(tokenizer, model, device=device, dtype=dtype)

    def encode(self, prompts: Sequence[str]) -> TextEmbeddings:
        """Embeddings of ``prompts`` (any number, duplicates allowed): each distinct non-empty
        prompt runs through the model once; "" is served from the cache built at construction."""
        prompts = list(prompts)
        unique = sorted({p for p in prompts if p != ""})
        table = self.empty  # row 0 is ""; row 1 + k is unique[k]
        if unique:
            fresh = self._run(unique)
            table = TextEmbeddings(
                torch.cat([self.empty.clip_text, fresh.clip_text]),
                torch.cat([self.empty.clip_text_pooled, fresh.clip_text_pooled]),
                self.empty.truncated + fresh.truncated,
            )
        rows = [0 if p == "" else 1 + unique.index(p) for p in prompts]
        index = torch.tensor(rows, dtype=torch.long, device=table.clip_text.device)
        return TextEmbeddings(
            table.clip_text[index],
            table.clip_text_pooled[index],
            [table.truncated[i] for i in rows],
        )

    @torch.inference_mode()
    def _run(self, prompts: list[str]) -> TextEmbeddings:
        """Tokenize (pad to max_length, truncate) and run the text model on all prompts at once."""
        # One token past the limit is enough to tell whether truncation drops anything.
        probe = self.tokenizer(prompts, truncation=True, max_length=self.max_length + 1)
        truncated = [len(ids) > self.max_length for ids in probe["input_ids"]]
        tokens = self.tokenizer(
            prompts,
            padding="max_length",
            max_length=self.max_length,
            truncation=True,
            return_tensors="pt",
        ).to(self.device)
        out = self.model(
            input_ids=tokens["input_ids"],
            attention_mask=tokens["attention_mask"],
            output_hidden_states=True,
        )
        return TextEmbeddings(
            clip_text=out.hidden_states[-1].float(),  # [B, L, D], before final_layer_norm
            clip_text_pooled=out.text_embeds.float().unsqueeze(1),  # [B, P] -> [B, 1, P]
            truncated=truncated,
        )
