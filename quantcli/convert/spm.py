"""A SentencePiece `tokenizer.model` read without the sentencepiece package.

The file is a protobuf `ModelProto` (sentencepiece_model.proto): field 1 repeats `SentencePiece
{piece: string = 1, score: float = 2, type: enum = 3}`, field 2 is the `TrainerSpec`, field 3 the
`NormalizerSpec`. Only what the converter asks `SentencePieceProcessor` for is decoded: each piece's
text, score and type, plus the trainer's model type and the normalizer's flags.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path

from quantcli.errors import InputError

# SentencePiece.Type (sentencepiece_model.proto); the same numbers as gguf.TokenType
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
UNIGRAM, BPE, WORD, CHAR = 1, 2, 3, 4  # TrainerSpec.ModelType


@dataclass
class SentencePieceModel:
    pieces: list[str] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)
    types: list[int] = field(default_factory=list)
    model_type: int = UNIGRAM
    add_dummy_prefix: bool = True
    remove_extra_whitespaces: bool = True


class _Proto:
    """Bounds-checked protobuf wire-format reader over one message's bytes."""

    def __init__(self, buf: bytes, path: Path) -> None:
        self.buf, self.pos, self.path = buf, 0, path

    def fail(self, what: str) -> InputError:
        return InputError(f"{self.path}: invalid SentencePiece model: {what}")

    def varint(self) -> int:
        out = shift = 0
        while True:
            if self.pos >= len(self.buf):
                raise self.fail("truncated varint")
            b = self.buf[self.pos]
            self.pos += 1
            out |= (b & 0x7F) << shift
            if b < 0x80:
                return out
            shift += 7
            if shift > 63:
                raise self.fail("varint longer than 10 bytes")

    def fields(self):
        """(field number, wire type, value): ints for varints, bytes for the rest."""
        while self.pos < len(self.buf):
            key = self.varint()
            num, wire = key >> 3, key & 7
            if wire == 0:
                yield num, wire, self.varint()
            elif wire in (1, 5):
                n = 8 if wire == 1 else 4
                if self.pos + n > len(self.buf):
                    raise self.fail(f"field {num} runs past the end")
                yield num, wire, self.buf[self.pos:self.pos + n]
                self.pos += n
            elif wire == 2:
                n = self.varint()
                if self.pos + n > len(self.buf):
                    raise self.fail(f"field {num} claims {n} bytes, {len(self.buf) - self.pos} left")
                yield num, wire, self.buf[self.pos:self.pos + n]
                self.pos += n
            else:
                raise self.fail(f"unsupported wire type {wire} for field {num}")


def _piece(raw: bytes, path: Path) -> tuple[str, float, int]:
    text, score, kind = "", 0.0, NORMAL
    for num, wire, value in _Proto(raw, path).fields():
        if num == 1 and wire == 2:
            text = value.decode("utf-8", errors="surrogateescape")
        elif num == 2 and wire == 5:
            score = struct.unpack("<f", value)[0]
        elif num == 3 and wire == 0:
            kind = value
    return text, score, kind


def load_sentencepiece(path: Path) -> SentencePieceModel:
    """Pieces, scores and types of a `tokenizer.model`, in id order."""
    try:
        buf = Path(path).read_bytes()
    except OSError as exc:
        raise InputError(f"{path}: cannot read: {exc.strerror}") from None
    model = SentencePieceModel()
    for num, wire, value in _Proto(buf, path).fields():
        if num == 1 and wire == 2:
            text, score, kind = _piece(value, path)
            model.pieces.append(text)
            model.scores.append(score)
            model.types.append(kind)
        elif num == 2 and wire == 2:
            for n, w, v in _Proto(value, path).fields():
                if n == 3 and w == 0:
                    model.model_type = v
        elif num == 3 and wire == 2:
            for n, w, v in _Proto(value, path).fields():
                if n == 3 and w == 0:
                    model.add_dummy_prefix = bool(v)
                elif n == 4 and w == 0:
                    model.remove_extra_whitespaces = bool(v)
    if not model.pieces:
        raise InputError(f"{path}: invalid SentencePiece model: no pieces")
    return model
