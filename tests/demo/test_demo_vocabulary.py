"""The demo model's prompt check (models/demo_vocabulary.py): every training caption passes and
nothing else does, the warning names the unknown words and the grammar, and the grammar in demo.json
is the training data's."""

from __future__ import annotations

import itertools
import json
import re

import pytest

from models.demo import DEMO_DIR, read_demo_config
from models.demo_vocabulary import (
    MAX_LISTED_WORDS,
    PromptGrammar,
    grammar_for_model,
    read_grammar,
    words_of,
)
from training import data
from training.train_demo import DEMO_PROMPTS

GRAMMAR = (
    "a {colour} {circle|square|triangle} [at the left |at the right ]on a {colour} background"
)


@pytest.fixture(scope="module")
def grammar() -> PromptGrammar:
    found = read_grammar(DEMO_DIR)
    assert found is not None
    return found


def test_demo_json_declares_the_training_captions():
    meta = json.loads((DEMO_DIR / "demo.json").read_text())
    assert meta["prompts"] == DEMO_PROMPTS  # what training/train_demo.py writes on export
    assert meta["prompts"]["grammar"] == GRAMMAR
    assert meta["prompts"]["slots"]["colour"] == list(data.COLOUR_NAMES)


def test_exactly_the_training_captions_pass(grammar):
    captions = set(data.all_captions())
    assert len(captions) == 504
    for caption in captions:
        assert grammar.check(caption) == [], caption
    # Every sentence of this form, the same colour twice included: only the 504 captions pass.
    positions = ["", "at the left ", "at the right "]
    tried = 0
    colours = data.COLOUR_NAMES
    for fg, bg, shape, pos in itertools.product(colours, colours, data.SHAPES, positions):
        prompt = f"a {fg} {shape} {pos}on a {bg} background"
        assert (grammar.check(prompt) == []) == (prompt in captions), prompt
        tried += 1
    assert tried == 8 * 8 * 3 * 3
    assert grammar.vocabulary == set(data.vocabulary())


def test_case_and_spacing_do_not_matter_as_for_the_tokenizer(grammar):
    assert grammar.check("  A RED Circle\tat the LEFT   on a blue\nbackground ") == []


def test_a_prompt_outside_the_vocabulary_names_its_words_and_the_grammar(grammar):
    (warning,) = grammar.check("an astronaut riding a horse", real_weights="real weights (X)")
    assert "does not know the words 'an', 'astronaut', 'riding', 'horse' in the prompt" in warning
    assert f"'{GRAMMAR}'" in warning
    assert "colour one of red, green, blue, yellow, white, black, purple, orange" in warning
    assert "Use real weights (X) for arbitrary prompts" in warning
    (one,) = grammar.check("a red circle on a blue background.")
    assert "the word '.' in the prompt" in one  # the tokenizer reads the full stop as a word


def test_known_words_in_another_form_or_repeated_colours_warn(grammar):
    (warning,) = grammar.check("a red circle")
    assert "uses words the demo model knows, but not in a form it was trained on" in warning
    (warning,) = grammar.check("background red a circle on a blue")
    assert "not in a form" in warning
    (warning,) = grammar.check("a red square at the right on a red background")
    assert "uses the colour 'red' twice" in warning


def test_the_negative_prompt_is_checked_too(grammar):
    ok = "a red circle on a blue background"
    assert grammar.check(ok, "") == grammar.check(ok, "   ") == []
    assert grammar.check(ok, "a green square on a white background") == []
    (warning,) = grammar.check(ok, "blurry, low quality")
    assert "'blurry', ',', 'low', 'quality' in the negative prompt" in warning
    assert "trained only with an empty negative prompt" in warning and GRAMMAR in warning
    both = grammar.check("a cat", "blurry")
    assert len(both) == 2 and "in the prompt" in both[0] and "the form above" in both[1]


def test_a_long_prompt_makes_a_short_warning(grammar):
    prompt = " ".join(f"x{chr(97 + i // 26)}{chr(97 + i % 26)}" for i in range(300))
    (warning,) = grammar.check(prompt)
    unknown = len(set(words_of(prompt)) - grammar.vocabulary)
    assert unknown == 300 and f"and {unknown - MAX_LISTED_WORDS} more" in warning
    assert len(warning) < 600


def test_only_the_demo_model_has_a_grammar():
    assert grammar_for_model({"demo": True, "weights": str(DEMO_DIR)}) is not None
    # Real weights never warn, even from a folder that has a demo.json.
    assert grammar_for_model({"demo": False, "weights": str(DEMO_DIR)}) is None
    assert grammar_for_model({"demo": True, "weights": "random tiny weights (seed 0)"}) is None
    assert grammar_for_model({"name": "stable-cascade"}) is None


@pytest.mark.parametrize(
    ("block", "says"),
    [
        ("a sentence", "'grammar' string"),
        ({"grammar": "a {colour} thing", "slots": {}}, "uses {colour}, not in 'slots'"),
        ({"grammar": "a {colour thing", "slots": {"colour": ["red"]}}, "cannot read the grammar"),
        ({"grammar": "a [red thing", "slots": {}}, "cannot read the grammar"),
        ({"grammar": "a {c}", "slots": {"c": []}}, "non-empty lists"),
        ({"grammar": "a {c}", "slots": {"c": ["red"]}, "distinct": ["d"]}, "'distinct'"),
        ({"grammar": "a {c-1}", "slots": {"c-1": ["red"]}}, "identifiers"),
    ],
)
def test_a_malformed_grammar_is_refused(block, says):
    with pytest.raises(ValueError, match=re.escape(says)):
        PromptGrammar.from_config(block)


def test_demo_json_without_a_valid_prompts_block_is_refused(tmp_path):
    meta = json.loads((DEMO_DIR / "demo.json").read_text())
    meta["prompts"] = {"grammar": "a {colour}", "slots": {}}
    (tmp_path / "demo.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="'prompts'"):
        read_demo_config(tmp_path)
    del meta["prompts"]
    (tmp_path / "demo.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="prompts"):
        read_demo_config(tmp_path)
