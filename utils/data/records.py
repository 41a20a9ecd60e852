"""The `.jsonl` line of a generated sequence and the teacher identity it carries: written and read here only.

generate_data.py writes one JSON object a line (paper section 2.1):

    {"text": "...", "input_ids": [17, ...], "start_token": 17, "greedy_tokens": 3, "shard": 0, "num_shards": 1,
     "teacher": "SmolLM2-135M-Instruct|vocab=49152|tokenizer=0123456789ab", "sampling": "greedy=3,4,5 ..."}

`teacher` says whose token ids these are: the model's name, its vocabulary size and a hash of its tokenizer's
vocabulary. Token ids of two teachers mean the same words only when the last two agree. The names of the embedded
default teacher are here too (utils/training/loading.py loads it): naming a teacher needs no model stack.

Training and evaluation read any JSON lines with `input_ids` (or `text`, tokenized) and an optional `teacher`
(`read_sequence`), so real text and other tools' files work too.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"  # the embedded default teacher


def is_default_model(name_or_path) -> bool:
    """The ways a user names the embedded default: nothing, "default", or its model name."""
    return name_or_path in (None, "", "default", DEFAULT_MODEL_NAME)


def model_display_name(name_or_path) -> str:
    return DEFAULT_MODEL_NAME if is_default_model(name_or_path) else str(name_or_path)


def tokenizer_hash(tokenizer) -> str:
    """A short hash of the tokenizer's vocabulary: equal hashes, equal token ids for the same words."""
    vocab = json.dumps(sorted(tokenizer.get_vocab().items(), key=lambda item: item[1]))
    return hashlib.sha256(vocab.encode()).hexdigest()[:12]


@dataclass(frozen=True)
class TeacherIdentity:
    name: str
    vocab_size: int
    tokenizer_hash: str

    @classmethod
    def of(cls, name: str, tokenizer, vocab_size: int) -> TeacherIdentity:
        return cls(name, vocab_size, tokenizer_hash(tokenizer))

    @classmethod
    def parse(cls, text) -> TeacherIdentity:
        """The identity written in a line; ValueError if `text` is not one."""
        try:
            name, vocab, tokenizer = text.rsplit("|", 2)
            if not (vocab.startswith("vocab=") and tokenizer.startswith("tokenizer=")):
                raise ValueError
            return cls(name, int(vocab.removeprefix("vocab=")), tokenizer.removeprefix("tokenizer="))
        except (AttributeError, ValueError):
            raise ValueError(f"teacher {text!r} is not NAME|vocab=N|tokenizer=HASH") from None

    def __str__(self) -> str:
        return f"{self.name}|vocab={self.vocab_size}|tokenizer={self.tokenizer_hash}"

    def same_token_ids(self, other: TeacherIdentity) -> bool:
        """Whether token ids written by `other` mean the same words to this teacher (names may differ)."""
        return (self.vocab_size, self.tokenizer_hash) == (other.vocab_size, other.tokenizer_hash)


def teacher_name(model_argument: str | None) -> str:
    """A local directory counts by its name, so nodes that hold the same teacher at different paths agree."""
    if is_default_model(model_argument):
        return DEFAULT_MODEL_NAME
    path = Path(model_argument)
    return path.resolve().name if path.is_dir() else model_argument


def _int(record: dict, name: str) -> int:
    value = record.get(name)
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"field '{name}' missing or not int")
    return value


def _str(record: dict, name: str) -> str:
    value = record.get(name)
    if not isinstance(value, str):
        raise ValueError(f"field '{name}' missing or not str")
    return value


@dataclass(frozen=True)
class SequenceRecord:
    """One generated sequence, as generate_data.py writes it."""

    input_ids: list[int]
    start_token: int
    greedy_tokens: int
    shard: int
    num_shards: int
    teacher: TeacherIdentity
    sampling: str  # SamplingConfig.describe(): a shard holds one setting, a merge one unless asked otherwise
    text: str = ""
    topk: tuple[int, int, int] | None = None  # (K, first row, S tail samples) of its teacher rows (teacher_topk.py)

    @property
    def topk_width(self) -> int:
        """Columns of its teacher rows: K + S (0 without rows)."""
        return self.topk[0] + self.topk[2] if self.topk else 0

    def to_line(self) -> str:
        record = {"text": self.text, "input_ids": self.input_ids, "start_token": self.start_token,
                  "greedy_tokens": self.greedy_tokens, "shard": self.shard, "num_shards": self.num_shards,
                  "teacher": str(self.teacher), "sampling": self.sampling}
        if self.topk is not None:  # [K, first row], and S only when there are tail samples
            record["topk"] = list(self.topk) if self.topk[2] else list(self.topk[:2])
        return json.dumps(record) + "\n"

    @classmethod
    def from_line(cls, line: str | bytes) -> SequenceRecord:
        """The record of one line; ValueError saying what is wrong otherwise (token ids are checked against the
        teacher's vocabulary)."""
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise ValueError("not JSON (a half-written line?)") from None
        if not isinstance(record, dict):
            raise ValueError("not a JSON object")
        teacher = TeacherIdentity.parse(_str(record, "teacher"))
        ids = record.get("input_ids")
        if not isinstance(ids, list) or not ids:
            raise ValueError("field 'input_ids' missing or empty")
        check_token_ids(ids, teacher.vocab_size)
        topk = record.get("topk")
        if topk is not None and not (isinstance(topk, list) and len(topk) in (2, 3)
                                     and all(isinstance(v, int) and v >= 0 for v in topk) and topk[0] > 0):
            raise ValueError("field 'topk' is not [K, first row] or [K, first row, S]")
        result = cls(ids, _int(record, "start_token"), _int(record, "greedy_tokens"), _int(record, "shard"),
                     _int(record, "num_shards"), teacher, _str(record, "sampling"), _str(record, "text"),
                     (*topk, 0)[:3] if topk else None)
        if ids[0] != result.start_token:
            raise ValueError("input_ids do not begin with start_token")
        return result


def check_token_ids(ids, vocab_size: int | None = None) -> None:
    """ValueError unless `ids` are integers, inside 0..vocab_size-1 when a size is given."""
    for token in ids:
        if not isinstance(token, int) or isinstance(token, bool):
            raise ValueError(f"token id {token!r} is not an integer")
        if token < 0 or (vocab_size is not None and token >= vocab_size):
            limit = f"0..{vocab_size - 1}" if vocab_size is not None else "0 or more"
            raise ValueError(f"token id {token} is outside the vocabulary ({limit})")


def plain_sequence_line(ids: list[int]) -> str:
    """The line of a sequence with no generation record (real text cut into windows): its token ids only."""
    return json.dumps({"input_ids": list(ids)}) + "\n"


def read_sequence(line: str, tokenizer=None, vocab_size: int | None = None) -> tuple[list[int], TeacherIdentity | None]:
    """Token ids of a training or evaluation line (`input_ids`, else `text` tokenized) and the teacher that wrote
    it, if it says; ValueError saying what is wrong."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise ValueError(f"not JSON ({err})") from None
    if not isinstance(record, dict) or not ("input_ids" in record or "text" in record):
        raise ValueError("not a JSON object with 'input_ids' or 'text'")
    if "input_ids" in record:
        ids = record["input_ids"]
    elif tokenizer is None:
        raise ValueError("a 'text' line needs a tokenizer")
    else:
        ids = tokenizer(record["text"])["input_ids"]
    if not isinstance(ids, list) or not ids:
        raise ValueError("no token ids")
    check_token_ids(ids, vocab_size)
    teacher = record.get("teacher")
    return ids, (TeacherIdentity.parse(teacher) if teacher else None)
