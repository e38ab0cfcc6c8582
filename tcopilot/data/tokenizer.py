"""Tokenizers with one small interface, so training and evaluation code never cares which one it holds.

``WordTokenizer`` is the tokenizer of the tiny from-scratch Pilot: whole words, single digits, single
punctuation marks. Splitting numbers into digits keeps the vocabulary closed (every number is spelled from
twenty digit tokens) and lets a small model learn arithmetic digit by digit.

Spacing is kept the way SentencePiece keeps it: a piece that follows whitespace is stored with a leading
``▁`` (U+2581), one that is glued to the previous piece is stored bare. So ``12`` is ``▁1`` followed by the
continuation ``2``, and ``ten.`` is ``▁ten`` ``.``. The start of a text counts as whitespace, which makes an
output encoded on its own (``▁7 ▁+ ▁5 ...``) decode with a space after a prompt that ends in ``A:``, and
the first word of a line carries ``▁`` as well, so both forms of a word rarely both enter the vocabulary.
Newlines are tokens of their own. ``decode(encode(t)) == WordTokenizer.normalize(t)``: runs of spaces and tabs
become one space, whitespace next to a newline and at either end of the text disappears; nothing else changes
(unknown pieces aside).

``HFTokenizer`` puts the same interface over a Hugging Face tokenizer so that real Pilots plug in unchanged.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from collections.abc import Iterable, Sequence

__all__ = ["WordTokenizer", "HFTokenizer", "SPACE"]

SPACE = "\u2581"
PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK)
DIGITS = "0123456789"

# Order matters: a newline before the catch-all, letters and digits before the catch-all for any other
# visible character (punctuation, symbols, ``▁`` itself), each of which becomes a piece on its own.
_PIECE = re.compile(r"\n|[^\W\d_]+|\d|[^\s]")
_HSPACE = re.compile(r"[^\S\n]+")
_SPACE_AROUND_NEWLINE = re.compile(r" ?\n ?")


def _split(text: str) -> list[tuple[bool, str]]:
    """(follows whitespace or the start of the text, piece) pairs; newline pieces carry False."""
    out = []
    for m in _PIECE.finditer(text):
        piece = m.group()
        if piece == "\n":
            out.append((False, piece))
        else:
            start = m.start()
            out.append((start == 0 or text[start - 1].isspace(), piece))
    return out


def _token(spaced: bool, piece: str) -> str:
    return SPACE + piece if spaced else piece


class WordTokenizer:
    """Word-level tokenizer with digit-split numbers; ``<pad>`` is always id 0."""

    def __init__(self, tokens: Sequence[str]):
        tokens = list(tokens)
        if tuple(tokens[: len(SPECIAL_TOKENS)]) != SPECIAL_TOKENS:
            raise ValueError(f"tokens must start with {SPECIAL_TOKENS}, got {tuple(tokens[:4])}")
        if len(set(tokens)) != len(tokens):
            dup = [t for t, c in Counter(tokens).items() if c > 1]
            raise ValueError(f"tokens must be unique, got duplicates {dup[:5]}")
        self._tokens = tokens
        self._ids = {t: i for i, t in enumerate(tokens)}
        self.pad_token_id, self.bos_token_id, self.eos_token_id, self.unk_token_id = range(4)
        self._special_ids = frozenset(range(len(SPECIAL_TOKENS)))

    # construction ------------------------------------------------------------------------------------
    @classmethod
    def build(cls, texts: Iterable[str], min_freq: int = 1) -> WordTokenizer:
        """Vocabulary of every token seen at least ``min_freq`` times in ``texts``.

        All twenty digit tokens are always included so that any number can be encoded, also in test
        texts. Order: special tokens, digits, then by descending count (ties alphabetical), which makes the
        ids deterministic for a given corpus.
        """
        if min_freq < 1:
            raise ValueError(f"min_freq must be >= 1, got {min_freq!r}")
        counts: Counter[str] = Counter()
        for text in texts:
            counts.update(_token(s, p) for s, p in _split(text))
        digits = [SPACE + d for d in DIGITS] + list(DIGITS)
        fixed = set(SPECIAL_TOKENS) | set(digits)
        rest = sorted(
            (t for t, c in counts.items() if c >= min_freq and t not in fixed), key=lambda t: (-counts[t], t)
        )
        return cls(list(SPECIAL_TOKENS) + digits + rest)

    def save(self, path: str | os.PathLike) -> None:
        with open(path, "w", encoding="utf-8") as f:
            json.dump({"type": "WordTokenizer", "version": 1, "tokens": self._tokens}, f, ensure_ascii=False)

    @classmethod
    def load(cls, path: str | os.PathLike) -> WordTokenizer:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        if not isinstance(data, dict) or data.get("type") != "WordTokenizer":
            raise ValueError(
                f"{os.fspath(path)!r} is not a saved WordTokenizer (missing type='WordTokenizer')"
            )
        return cls(data["tokens"])

    # properties --------------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return len(self._tokens)

    def __len__(self) -> int:
        return len(self._tokens)

    @property
    def tokens(self) -> list[str]:
        return list(self._tokens)

    def token_to_id(self, token: str) -> int:
        return self._ids.get(token, self.unk_token_id)

    def id_to_token(self, index: int) -> str:
        return self._tokens[index]

    def convert_ids_to_tokens(self, ids: Iterable[int]) -> list[str]:
        return [self._tokens[i] for i in ids]

    # encode / decode ---------------------------------------------------------------------------------
    @staticmethod
    def normalize(text: str) -> str:
        """The text ``decode(encode(text))`` gives back when every piece is in the vocabulary."""
        text = _HSPACE.sub(" ", text)
        return _SPACE_AROUND_NEWLINE.sub("\n", text).strip(" ")

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        ids = [self._ids.get(_token(s, p), self.unk_token_id) for s, p in _split(text)]
        if add_bos:
            ids.insert(0, self.bos_token_id)
        if add_eos:
            ids.append(self.eos_token_id)
        return ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        out: list[str] = []
        for i in ids:
            i = int(i)
            if i in self._special_ids:
                if skip_special_tokens:
                    continue
                spaced, piece = True, self._tokens[i]
            elif 0 <= i < len(self._tokens):
                tok = self._tokens[i]
                # A lone "▁" is the piece "▁" glued to its left neighbour, not an empty spaced piece.
                spaced = tok.startswith(SPACE) and len(tok) > 1
                piece = tok[1:] if spaced else tok
            else:
                raise ValueError(f"token id must lie in [0, {len(self._tokens)}), got {i}")
            if spaced and out and out[-1] != "\n":
                out.append(" ")
            out.append(piece)
        return "".join(out)

    def batch_decode(self, sequences: Iterable[Iterable[int]], skip_special_tokens: bool = True) -> list[str]:
        return [self.decode(s, skip_special_tokens) for s in sequences]

    def __repr__(self) -> str:
        return f"WordTokenizer(vocab_size={self.vocab_size})"


class HFTokenizer:
    """The ``WordTokenizer`` interface over a Hugging Face tokenizer.

    ``encode`` never lets the Hugging Face tokenizer add its own special tokens: ``add_bos``/``add_eos``
    decide, so prompts and targets are assembled the same way for both tokenizers. A tokenizer without a
    BOS token (Qwen, for one) gets none (``bos_token_id`` is None and ``add_bos`` does nothing); one without
    a pad token pads with EOS, which is safe because padding is masked out of attention and labels.
    """

    def __init__(self, tokenizer):
        if tokenizer.eos_token_id is None:
            raise ValueError(
                f"tokenizer must define an eos token, got eos_token_id=None for {type(tokenizer).__name__}"
            )
        self.tokenizer = tokenizer
        self.eos_token_id: int = tokenizer.eos_token_id
        self.bos_token_id: int | None = tokenizer.bos_token_id
        pad = tokenizer.pad_token_id
        self.pad_token_id: int = self.eos_token_id if pad is None else pad
        self.unk_token_id: int | None = tokenizer.unk_token_id

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, **kwargs) -> HFTokenizer:
        from transformers import AutoTokenizer

        return cls(AutoTokenizer.from_pretrained(name_or_path, **kwargs))

    @property
    def vocab_size(self) -> int:
        # len() counts added tokens, which ``tokenizer.vocab_size`` leaves out; the embedding must cover them.
        return len(self.tokenizer)

    def __len__(self) -> int:
        return len(self.tokenizer)

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        ids = list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        if add_bos and self.bos_token_id is not None:
            ids.insert(0, self.bos_token_id)
        if add_eos:
            ids.append(self.eos_token_id)
        return ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def batch_decode(self, sequences: Iterable[Iterable[int]], skip_special_tokens: bool = True) -> list[str]:
        return [self.decode(s, skip_special_tokens) for s in sequences]

    def save(self, path: str | os.PathLike) -> None:
        self.tokenizer.save_pretrained(path)

    def __repr__(self) -> str:
        return f"HFTokenizer({type(self.tokenizer).__name__}, vocab_size={self.vocab_size})"
