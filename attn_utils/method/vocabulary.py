"""Words of a prompt that a small, closed tokenizer does not know (the toy world's).

A real CLIP tokenizer (49,408 entries) reads any word through its byte-pair pieces: a rare
word in a few pieces is how it sees that word, nothing to warn about. A closed vocabulary of a
few hundred entries (the toy world's 35 words and the merges that spell them) has no piece
for a word it never learned, so such a word falls apart, somewhere, into single letters, and
the text encoder sees a sequence it was never trained on. Words the vocabulary itself splits
into longer pieces (the tiny test model's "wombat" = "wom" + "bat") stay known.
"""

from __future__ import annotations

import string

CLOSED_VOCABULARY = 10_000  # entries; real CLIP tokenizers have 49,408
_EOW = "</w>"


def unknown_words(tokenizer, texts: list[str]) -> list[str]:
    """The words of `texts` (in first-seen order, once each) that a closed vocabulary spells
    with a single letter somewhere; [] for a large (real) vocabulary. '{}' is skipped."""
    if len(tokenizer) >= CLOSED_VOCABULARY:
        return []
    out: list[str] = []
    for text in texts:
        for raw in text.replace("{}", " ").split():
            word = raw.strip(string.punctuation)
            if not word or word.lower() in out:
                continue
            pieces = [p.removesuffix(_EOW) for p in tokenizer.tokenize(word)]
            if len(pieces) > 1 and any(len(p) == 1 and p.isalpha() for p in pieces):
                out.append(word.lower())
    return out
