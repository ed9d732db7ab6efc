"""Token ids for the experts: the world vocabulary's words plus the models' special tokens.

The checkpoint stores the token list, so a model always decodes with the ids it was
trained with; ``UnknownWordError`` (a ``ValueError``) names every word it does not know.
"""

from __future__ import annotations

import re

PAD, SEP, EOS = "<pad>", "<sep>", "<eos>"
SPECIALS = (PAD, SEP, EOS)
_WORD = re.compile(r"[a-z0-9]+|[^\sa-z0-9]", re.IGNORECASE)


class UnknownWordError(ValueError):
    def __init__(self, words: list[str]):
        self.words = words
        super().__init__(f"unknown word(s): {', '.join(repr(w) for w in words)}")


def split(text: str) -> list[str]:
    """Lower-cased words; punctuation and each CJK character are tokens of their own."""
    return [w.lower() for w in _WORD.findall(text)]


class Tokenizer:
    def __init__(self, words: list[str]):
        self._tokens = list(SPECIALS) + [w for w in words if w not in SPECIALS]
        self._ids = {w: i for i, w in enumerate(self._tokens)}
        self.pad_id, self.sep_id, self.eos_id = (self._ids[s] for s in SPECIALS)

    @classmethod
    def from_tokens(cls, tokens: list[str]) -> "Tokenizer":
        tok = cls(tokens)
        if tok.tokens() != list(tokens):
            raise ValueError("token list must start with the special tokens " + ", ".join(SPECIALS))
        return tok

    @classmethod
    def from_texts(cls, texts: list[str]) -> "Tokenizer":
        return cls(sorted({w for t in texts for w in split(t)}))

    def tokens(self) -> list[str]:
        return list(self._tokens)

    def __len__(self) -> int:
        return len(self._tokens)

    def encode(self, text: str) -> list[int]:
        words = split(text)
        unknown = [w for w in words if w not in self._ids or w in SPECIALS]
        if unknown:
            raise UnknownWordError(sorted(set(unknown), key=unknown.index))
        return [self._ids[w] for w in words]

    def decode(self, ids: list[int]) -> str:
        """Words joined by spaces; no space before punctuation or around CJK characters."""
        out: list[str] = []
        for w in (self._tokens[i] for i in ids):
            if w in SPECIALS:
                continue
            latin = w.isascii() and w[0].isalnum()
            if out and latin and out[-1].isascii():
                out.append(" ")
            out.append(w)
        return "".join(out)
