"""CLIP text conditioning: official semantics (spec §9), offline tokenizer, truncation, and the
empty-prompt cache."""

from __future__ import annotations

import pytest
import torch

from models.text import TextEncoder, build_byte_tokenizer
from models.tiny import build_tiny_text_encoder

pytestmark = pytest.mark.usefixtures("single_thread")


def test_byte_tokenizer_is_offline_and_pads_to_77_with_the_end_token():
    tok = build_byte_tokenizer()
    assert len(tok) == 514
    assert tok.model_max_length == 77
    out = tok(["ab c"], padding="max_length", max_length=77, truncation=True)
    # BOS, byte 'a', byte 'b' + </w> (256 + 98), 'c' + </w>, EOS, then EOS padding; the mask covers
    # 5 tokens.
    assert out["input_ids"][0][:7] == [512, 97, 256 + 98, 256 + 99, 513, 513, 513]
    assert len(out["input_ids"][0]) == 77
    assert sum(out["attention_mask"][0]) == 5
    # Any UTF-8 text is representable (multi-byte characters become their bytes).
    assert tok.unk_token_id not in tok("日本 é")["input_ids"][1:-1]


def _reference_outputs(enc: TextEncoder, prompt: str, use_mask: bool):
    tokens = enc.tokenizer(
        [prompt], padding="max_length", max_length=77, truncation=True, return_tensors="pt"
    )
    with torch.no_grad():
        return enc.model(
            input_ids=tokens["input_ids"],
            attention_mask=tokens["attention_mask"] if use_mask else None,
            output_hidden_states=True,
        )


def test_clip_text_is_pre_final_norm_hidden_state_with_attention_mask(tiny_text_encoder):
    enc = tiny_text_encoder
    prompt = "a red circle"
    emb = enc.encode([prompt])
    assert emb.clip_text.shape == (1, 77, 32)
    assert emb.clip_text_pooled.shape == (1, 1, 32)
    masked = _reference_outputs(enc, prompt, use_mask=True)
    torch.testing.assert_close(emb.clip_text, masked.hidden_states[-1])
    torch.testing.assert_close(emb.clip_text_pooled, masked.text_embeds[:, None])
    # Using last_hidden_state (after final_layer_norm) would give something else ...
    assert (emb.clip_text - masked.last_hidden_state).abs().max() > 0.1
    # ... and so would dropping the key-padding mask: the padding positions (all 77 reach Stage C)
    # change.
    unmasked = _reference_outputs(enc, prompt, use_mask=False)
    n_real = len(enc.tokenizer(prompt)["input_ids"])
    assert (emb.clip_text[:, n_real:] - unmasked.hidden_states[-1][:, n_real:]).abs().max() > 1e-3
    torch.testing.assert_close(emb.clip_text[:, :n_real], unmasked.hidden_states[-1][:, :n_real])


def test_truncation_is_flagged_not_an_error(tiny_text_encoder):
    # One 75-byte word = 75 tokens + BOS + EOS = 77: fits exactly. One more byte is cut off.
    fits, cut = "a" * 75, "a" * 76
    emb = tiny_text_encoder.encode([fits, cut, "short", "word " * 200])
    assert emb.truncated == [False, True, False, True]
    assert emb.clip_text.shape == (4, 77, 32)
    # Truncation keeps the start: BOS + the first 74 bytes are identical tokens, and the text model
    # is causal.
    torch.testing.assert_close(emb.clip_text[1, :75], emb.clip_text[0, :75])


def test_empty_prompt_is_encoded_once_at_construction_and_duplicates_once_per_call():
    enc = build_tiny_text_encoder(seed=3)
    calls = []
    handle = enc.model.register_forward_hook(
        lambda m, args, kwargs, out: calls.append(kwargs["input_ids"].shape[0]), with_kwargs=True
    )
    try:
        empty = enc.encode(["", ""])
        assert calls == []  # served from the cache built at construction
        torch.testing.assert_close(empty.clip_text[0], enc.empty.clip_text[0])
        both = enc.encode(["b", "", "a", "b"])
        assert calls == [2]  # one forward, the two distinct non-empty prompts only
    finally:
        handle.remove()
    fresh = build_tiny_text_encoder(seed=3)._run(["b", "", "a", "b"])
    torch.testing.assert_close(both.clip_text, fresh.clip_text)
    torch.testing.assert_close(both.clip_text_pooled, fresh.clip_text_pooled)


def test_loads_from_snapshot_style_folders(tmp_path):
    enc = build_tiny_text_encoder(seed=1)
    enc.tokenizer.save_pretrained(tmp_path / "tokenizer")
    enc.model.save_pretrained(tmp_path / "text_encoder")
    loaded = TextEncoder.from_pretrained(tmp_path)
    a, b = enc.encode(["hello world"]), loaded.encode(["hello world"])
    torch.testing.assert_close(a.clip_text, b.clip_text)
    torch.testing.assert_close(a.clip_text_pooled, b.clip_text_pooled)
    assert loaded.max_length == 77
