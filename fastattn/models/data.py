"""Byte-level text data with no download, and the three training tasks made from it.

The corpus is, by default, the Python standard library's own ``*.py`` files (sorted, capped in
size); any text file or folder can replace it. Tokens are bytes (0..255) plus four special tokens.
A batch is a pure function of (seed, step, split): a run resumed at step s, or split over N
processes, sees exactly the batches an uninterrupted single-process run sees.

Tasks, one per architecture:
- ``lm`` (decoder): predict each next byte of a window.
- ``mlm`` (encoder): BERT's masked LM: 15% of the positions are chosen, 80% of those replaced by
  [MASK], 10% by a random byte, 10% left; only the chosen positions are predicted.
- ``reverse`` (encoder-decoder): the encoder reads a window backwards, the decoder writes it
  forwards. Its own left context is not enough to do that well: it must read the source through
  cross-attention.
"""

from __future__ import annotations

import os
import sysconfig
from dataclasses import dataclass, fields
from pathlib import Path

import torch

PAD, BOS, EOS, MASK = 256, 257, 258, 259
VOCAB_SIZE = 260  # 256 bytes + the special tokens above
MODEL_VOCAB_SIZE = 320  # the embedding padded to a multiple of 64 (GPU-friendly GEMM shapes)
TASKS = {"decoder": "lm", "encoder": "mlm", "encoder-decoder": "reverse"}
IGNORE_INDEX = -100
MLM_FRACTION = 0.15
_SPLITS = {"train": 0, "val": 1}
_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__"}


class DataError(ValueError):
    """The corpus cannot be read or is too small."""


# --------------------------------------------------------------------------------------------
# corpus
# --------------------------------------------------------------------------------------------


def _files_under(root: Path, suffix: str | None) -> list[Path]:
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in _SKIP_DIRS and not d.startswith("."))
        found += [Path(folder, f) for f in sorted(files) if not f.startswith(".") and (suffix is None or f.endswith(suffix))]
    return found


def read_corpus(path: str | os.PathLike | None = None, max_bytes: int = 16 << 20) -> bytes:
    """The bytes of a text file, of a folder's files (sorted, binary files skipped), or by
    default of the standard library's ``*.py`` files; at most ``max_bytes``."""
    if path is None:
        files = _files_under(Path(sysconfig.get_paths()["stdlib"]), ".py")
    else:
        path = Path(path)
        if not path.exists():
            raise DataError(f"--data: no such file or folder: {path}")
        files = _files_under(path, None) if path.is_dir() else [path]
    chunks, total, binary = [], 0, 0
    for file in files:
        try:
            data = file.read_bytes()
        except OSError as exc:
            if path is not None and not Path(path).is_dir():
                raise DataError(f"--data: cannot read {file}: {exc.strerror}") from None
            continue
        if b"\0" in data[:4096]:  # a binary file: skipped in a folder, refused on its own
            if path is not None and not Path(path).is_dir():
                raise DataError(f"--data: {file} is a binary file (a NUL byte in its first 4 KiB): give a text file")
            binary += 1
            continue
        chunks.append(data[: max_bytes - total])
        total += len(chunks[-1])
        if total >= max_bytes:
            break
    if path is not None and not chunks and binary:
        raise DataError(f"--data: {path} holds only binary files ({binary} skipped): give text")
    return b"".join(chunks)


@dataclass
class TextData:
    """The corpus as uint8 tensors: the first (1 - val_fraction) for training, the rest for validation."""

    train: torch.Tensor
    val: torch.Tensor

    @classmethod
    def from_bytes(cls, data: bytes, min_len: int, val_fraction: float = 0.1) -> TextData:
        tokens = torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)
        n_val = int(len(tokens) * val_fraction)
        train, val = tokens[: len(tokens) - n_val], tokens[len(tokens) - n_val :]
        if len(val) < min_len:
            raise DataError(
                f"the corpus has {len(tokens)} bytes: too small for windows of {min_len} bytes "
                f"(validation gets {val_fraction:.0%} of it); give more text or a shorter --seq-len"
            )
        return cls(train, val)

    def split(self, name: str) -> torch.Tensor:
        return self.train if name == "train" else self.val


# --------------------------------------------------------------------------------------------
# batches
# --------------------------------------------------------------------------------------------


@dataclass
class Batch:
    """What the model takes: ``model(idx, targets, source=source)``; every field (B, ·) int64."""

    idx: torch.Tensor
    targets: torch.Tensor
    source: torch.Tensor | None = None

    def __getitem__(self, rows: slice) -> Batch:
        return Batch(*(None if t is None else t[rows] for t in self._tensors()))

    def to(self, device, non_blocking: bool = False) -> Batch:
        return Batch(*(None if t is None else t.to(device, non_blocking=non_blocking) for t in self._tensors()))

    def _tensors(self):
        return [getattr(self, f.name) for f in fields(self)]

    @property
    def num_targets(self) -> int:
        """Tokens that count in the loss."""
        return int((self.targets != IGNORE_INDEX).sum())

    def __len__(self) -> int:
        return self.idx.size(0)


def batch_generator(seed: int, step: int, split: str) -> torch.Generator:
    """The RNG of one batch, a function of (seed, step, split) only (a splitmix-style hash)."""
    x = (seed * 0x9E3779B97F4A7C15 + step * 0xBF58476D1CE4E5B9 + _SPLITS[split] * 0x94D049BB133111EB) % 2**64
    x ^= x >> 31
    return torch.Generator().manual_seed(x % 2**63)


def windows(data: torch.Tensor, n: int, length: int, gen: torch.Generator) -> torch.Tensor:
    """n random windows of ``length`` bytes of data, as int64 (n, length)."""
    starts = torch.randint(0, len(data) - length + 1, (n,), generator=gen)
    return data[starts[:, None] + torch.arange(length)].long()


def make_batch(task: str, data: torch.Tensor, *, seed: int, step: int, batch_size: int, seq_len: int, split: str) -> Batch:
    """Batch ``step`` of ``task`` from data (uint8), reproducible from (seed, step, split)."""
    gen = batch_generator(seed, step, split)
    if task == "lm":
        w = windows(data, batch_size, seq_len + 1, gen)
        return Batch(w[:, :-1], w[:, 1:])
    w = windows(data, batch_size, seq_len, gen)
    if task == "mlm":
        return mask_tokens(w, gen)
    if task == "reverse":
        bos = torch.full((batch_size, 1), BOS, dtype=torch.long)
        return Batch(torch.cat((bos, w[:, :-1]), dim=1), w, source=reversed_source(w))
    raise ValueError(f"unknown task {task!r}; expected one of {', '.join(TASKS.values())}")


def reversed_source(tokens: torch.Tensor) -> torch.Tensor:
    """The encoder's input for the reverse task: the tokens backwards."""
    return tokens.flip(-1)


def mask_tokens(tokens: torch.Tensor, gen: torch.Generator) -> Batch:
    """BERT's masking of tokens (B, T); at least one position per row is predicted."""
    chosen = torch.rand(tokens.shape, generator=gen) < MLM_FRACTION
    chosen[torch.arange(tokens.size(0)), torch.randint(0, tokens.size(1), (tokens.size(0),), generator=gen)] = True
    action = torch.rand(tokens.shape, generator=gen)
    random_bytes = torch.randint(0, 256, tokens.shape, generator=gen)
    idx = torch.where(chosen & (action < 0.8), MASK, tokens)
    idx = torch.where(chosen & (action >= 0.8) & (action < 0.9), random_bytes, idx)
    return Batch(idx, tokens.masked_fill(~chosen, IGNORE_INDEX))


def encode_text(text: str) -> list[int]:
    return list(text.encode("utf-8"))


def decode_tokens(tokens) -> str:
    """Bytes back to text; special tokens are dropped, broken UTF-8 shown as U+FFFD."""
    return bytes(t for t in tokens if 0 <= t < 256).decode("utf-8", errors="replace")
