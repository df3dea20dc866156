"""What the built-in demo model understands: a check of a prompt against the words and sentence
form it was trained on, so that a prompt outside them is answered with a warning instead of a silent
coloured square. Plain Python (no torch): the service and the CLI call it before generating.

The demo model's ``demo.json`` declares its prompts (``"prompts"``), so the check follows the model:

    "prompts": {
      "grammar": "a {colour} {circle|square|triangle} [at the left |at the right ]on a ...",
      "slots": {"colour": ["red", "green", ...]},
      "distinct": ["colour"]
    }

Grammar syntax: ``{name}`` is one of ``slots[name]``; ``{a|b}`` is one of the alternatives;
``[a |b ]`` is optionally one of them; everything else is literal. ``distinct`` lists slots whose
occurrences in one prompt must differ (the model never saw a red circle on a red background).

Prompts are compared as the CLIP tokenizer reads them: lower-cased, whitespace collapsed, letters,
digits and punctuation split apart (so a trailing "." is a word the model never saw).
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# CLIP's pre-tokenizer pattern (\p{L} -> [^\W\d_], \p{N} -> \d): how the text tower splits words.
_WORDS = re.compile(r"'s|'t|'re|'ve|'m|'ll|'d|[^\W\d_]+|\d|(?:[^\s\w]|_)+")
# One piece of a grammar: {slot or a|b}, [optional a |b ], or literal text up to the next bracket.
_PIECE = re.compile(r"\{([^{}\[\]]*)\}|\[([^{}\[\]]*)\]|([^{}\[\]]+)")
MAX_LISTED_WORDS = 8  # a 2000-character prompt must not make a 2000-character warning


def words_of(text: str) -> list[str]:
    """``text`` split into the words the CLIP tokenizer sees, lower-cased."""
    return _WORDS.findall(text.lower())


def _spaced(text: str) -> str:
    """A piece of grammar in the form prompts are matched in (its words one space apart), keeping
    one space at either end where the piece has one: it separates the piece from its neighbours."""
    lead = " " if text[:1].isspace() else ""
    tail = " " if text[-1:].isspace() and text.strip() else ""
    return lead + " ".join(words_of(text)) + tail


@dataclass(frozen=True)
class PromptGrammar:
    """The prompts one model was trained on (see the module docstring for the syntax)."""

    grammar: str
    slots: Mapping[str, tuple[str, ...]]
    distinct: tuple[str, ...]
    vocabulary: frozenset[str]
    pattern: re.Pattern[str]
    slot_groups: Mapping[str, tuple[str, ...]]  # slot name -> its regex group names

    @classmethod
    def from_config(cls, block: Any, source: str = "prompts") -> PromptGrammar:
        """From a demo.json ``"prompts"`` block; ValueError naming ``source`` and what is wrong."""
        if not isinstance(block, Mapping) or not isinstance(block.get("grammar"), str):
            raise ValueError(f"{source}: must be an object with a 'grammar' string")
        raw_slots = block.get("slots", {})
        if not isinstance(raw_slots, Mapping) or not all(
            isinstance(v, list) and v and all(isinstance(w, str) and w.strip() for w in v)
            for v in raw_slots.values()
        ):
            raise ValueError(f"{source}: 'slots' must map names to non-empty lists of words")
        if not all(isinstance(name, str) and name.isidentifier() for name in raw_slots):
            raise ValueError(f"{source}: slot names must be identifiers, got {list(raw_slots)}")
        slots = {name: tuple(values) for name, values in raw_slots.items()}
        distinct = block.get("distinct", [])
        if not isinstance(distinct, list) or not set(distinct) <= set(slots):
            raise ValueError(f"{source}: 'distinct' must list slot names, got {distinct!r}")
        grammar = block["grammar"]
        regex: list[str] = []
        vocabulary: set[str] = set()
        groups: dict[str, list[str]] = {name: [] for name in slots}
        position = 0
        for match in _PIECE.finditer(grammar):
            if match.start() != position:  # an unbalanced bracket was skipped
                break
            position = match.end()
            chosen, optional, literal = match.groups()
            if literal is not None:
                vocabulary.update(words_of(literal))
                regex.append(re.escape(_spaced(literal)))
                continue
            body = chosen if chosen is not None else optional
            group = ""
            if chosen is not None and "|" not in body:
                if body not in slots:
                    raise ValueError(f"{source}: the grammar uses {{{body}}}, not in 'slots'")
                alternatives: Sequence[str] = slots[body]
                group = f"{body}_{len(groups[body])}"
                groups[body].append(group)
            else:
                alternatives = body.split("|")
            vocabulary.update(w for a in alternatives for w in words_of(a))
            options = "|".join(re.escape(_spaced(a)) for a in alternatives)
            regex.append(f"(?P<{group}>{options})" if group else f"(?:{options})")
            if optional is not None:
                regex[-1] += "?"
        if position != len(grammar) or not regex:
            raise ValueError(f"{source}: cannot read the grammar {grammar!r} at index {position}")
        return cls(
            grammar=grammar,
            slots=slots,
            distinct=tuple(distinct),
            vocabulary=frozenset(vocabulary),
            pattern=re.compile("".join(regex).strip()),
            slot_groups={name: tuple(g) for name, g in groups.items()},
        )

    def form(self) -> str:
        """For a person: ``'a {colour} ...' with colour one of red, green, ...``."""
        slots = "; ".join(f"{name} one of {', '.join(v)}" for name, v in self.slots.items())
        return f"'{self.grammar}'" + (f" with {slots}" if slots else "")

    def problem(self, text: str, what: str = "prompt") -> str | None:
        """What in ``text`` (the ``what`` of a request) the model was not trained on, as a clause,
        or None when ``text`` is one of the model's sentences."""
        words = words_of(text)
        unknown = list(dict.fromkeys(w for w in words if w not in self.vocabulary))
        if unknown:
            listed = ", ".join(f"'{w}'" for w in unknown[:MAX_LISTED_WORDS])
            more = len(unknown) - MAX_LISTED_WORDS
            listed += f" and {more} more" if more > 0 else ""
            plural = "s" if len(unknown) > 1 else ""
            return f"the demo model does not know the word{plural} {listed} in the {what}"
        match = self.pattern.fullmatch(" ".join(words))
        if match is None:
            return (
                f"the {what} uses words the demo model knows, but not in a form it was trained on"
            )
        for name in self.distinct:
            values = [match.group(g) for g in self.slot_groups[name]]
            if len(set(values)) < len(values):
                repeated = next(v for v in values if values.count(v) > 1)
                return (
                    f"the {what} uses the {name} '{repeated}' twice, which the demo model was "
                    "never trained on"
                )
        return None

    def check(
        self, prompt: str, negative_prompt: str = "", *, real_weights: str = "real weights"
    ) -> list[str]:
        """One warning per field the model was not trained on (empty when both are fine). An empty
        negative prompt is what the model was trained with. ``real_weights`` says how to load
        real weights (the service's setting, the CLI's flag)."""
        warnings = []
        if (problem := self.problem(prompt)) is not None:
            warnings.append(
                f"{problem}; it draws only prompts of the form {self.form()}, so the image is "
                f"unlikely to follow this prompt. Use {real_weights} for arbitrary prompts."
            )
        if negative_prompt.strip():
            if (problem := self.problem(negative_prompt, "negative prompt")) is not None:
                form = "the form above" if warnings else self.form()
                warnings.append(
                    f"{problem}; it was trained only with an empty negative prompt or one of "
                    f"{form}, so this one may not steer the image as meant."
                )
        return warnings


def read_grammar(folder: str | Path) -> PromptGrammar | None:
    """The grammar declared in ``folder/demo.json``; None if the folder has no demo.json or it
    declares no prompts. ValueError for a malformed declaration."""
    file = Path(folder) / "demo.json"
    try:
        meta = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if not isinstance(meta, dict) or "prompts" not in meta:
        return None
    return PromptGrammar.from_config(meta["prompts"], source=f"{file}: 'prompts'")


@functools.lru_cache(maxsize=8)
def _cached_grammar(folder: str) -> PromptGrammar | None:
    return read_grammar(folder)


def grammar_for_model(model_info: Mapping[str, Any]) -> PromptGrammar | None:
    """The prompt grammar of a loaded model (``pipeline.model_info``): the demo model's, read once
    from the ``demo.json`` of its weights folder; None for real weights, which never warn."""
    if model_info.get("demo") is not True:
        return None
    folder = model_info.get("weights")
    return _cached_grammar(str(folder)) if isinstance(folder, str) and folder else None
