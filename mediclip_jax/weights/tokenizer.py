"""CLIP's byte-level BPE tokenizer (49,408 tokens, 77-token context).

Reads the vocabulary either from OpenAI's `bpe_simple_vocab_16e6.txt.gz` or from a
Hugging Face checkpoint directory (`vocab.json` + `merges.txt`). Text is cleaned as
OpenAI / open_clip do (ftfy, HTML unescape, whitespace collapse, lower case), so ids
equal theirs; sequences are `<start> tokens <end>` zero-padded to the context length,
truncated to keep the end token.
"""
from __future__ import annotations

import functools
import gzip
import html
import json
import os

import ftfy
import numpy as np
import regex

SOT = "<|startoftext|>"
EOT = "<|endoftext|>"
_PATTERN = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
    regex.IGNORECASE)


@functools.lru_cache()
def bytes_to_unicode() -> dict[int, str]:
  """GPT-2's reversible map from the 256 byte values to printable unicode characters."""
  bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
  cs = bs[:]
  n = 0
  for b in range(256):
    if b not in bs:
      bs.append(b)
      cs.append(256 + n)
      n += 1
  return dict(zip(bs, map(chr, cs)))


def clean_text(text: str) -> str:
  text = ftfy.fix_text(text)
  text = html.unescape(html.unescape(text)).strip()
  return regex.sub(r"\s+", " ", text).strip().lower()


def _merges_from_bpe_gz(path: str) -> list[tuple[str, str]]:
  with gzip.open(path, "rt", encoding="utf-8") as f:
    lines = f.read().split("\n")
  # First line is a version header; OpenAI uses the first 49152 - 256 - 2 merges.
  merges = lines[1:49152 - 256 - 2 + 1]
  return [tuple(m.split()) for m in merges]


def _vocab_from_merges(merges: list[tuple[str, str]]) -> list[str]:
  base = list(bytes_to_unicode().values())
  vocab = base + [v + "</w>" for v in base]
  vocab += ["".join(m) for m in merges]
  return vocab + [SOT, EOT]


class Tokenizer:
  """CLIP BPE tokenizer. `Tokenizer(path)` accepts a `.txt.gz` BPE file or a directory."""

  def __init__(self, path: str | os.PathLike, context_length: int = 77):
    path = os.fspath(path)
    if os.path.isdir(path):
      vocab_file, merges_file = os.path.join(path, "vocab.json"), os.path.join(path, "merges.txt")
      for f in (vocab_file, merges_file):
        if not os.path.isfile(f):
          raise FileNotFoundError(f"{path}: tokenizer directory needs vocab.json and merges.txt; {f} is missing")
      with open(vocab_file, encoding="utf-8") as f:
        self.encoder: dict[str, int] = json.load(f)
      with open(merges_file, encoding="utf-8") as f:
        lines = [l for l in f.read().split("\n") if l and not l.startswith("#version")]
      merges = [tuple(l.split()) for l in lines]
    elif path.endswith(".gz") and os.path.isfile(path):
      merges = _merges_from_bpe_gz(path)
      self.encoder = {tok: i for i, tok in enumerate(_vocab_from_merges(merges))}
    else:
      raise FileNotFoundError(f"{path}: expected a bpe_simple_vocab_16e6.txt.gz file or a directory "
                              "with vocab.json + merges.txt")
    bad = [m for m in merges if len(m) != 2]
    if bad:
      raise ValueError(f"{path}: malformed merges (expected two symbols per line), e.g. {bad[0]}")
    self.decoder = {i: t for t, i in self.encoder.items()}
    self.byte_encoder = bytes_to_unicode()
    self.byte_decoder = {v: k for k, v in self.byte_encoder.items()}
    self.bpe_ranks = {m: i for i, m in enumerate(merges)}
    self.cache = {SOT: SOT, EOT: EOT}
    self.sot_token, self.eot_token = self.encoder[SOT], self.encoder[EOT]
    self.vocab_size = len(self.encoder)
    self.context_length = context_length

  def _bpe(self, token: str) -> str:
    if token in self.cache:
      return self.cache[token]
    word = list(token[:-1]) + [token[-1] + "</w>"]
    while len(word) > 1:
      pairs = {(word[i], word[i + 1]) for i in range(len(word) - 1)}
      best = min(pairs, key=lambda p: self.bpe_ranks.get(p, float("inf")))
      if best not in self.bpe_ranks:
        break
      first, second = best
      merged, i = [], 0
      while i < len(word):
        if i < len(word) - 1 and word[i] == first and word[i + 1] == second:
          merged.append(first + second)
          i += 2
        else:
          merged.append(word[i])
          i += 1
      word = merged
    out = " ".join(word)
    self.cache[token] = out
    return out

  def encode(self, text: str) -> list[int]:
    """BPE ids of `text` without start/end tokens."""
    ids = []
    for tok in regex.findall(_PATTERN, clean_text(text)):
      tok = "".join(self.byte_encoder[b] for b in tok.encode("utf-8"))
      ids.extend(self.encoder[t] for t in self._bpe(tok).split(" "))
    return ids

  def decode(self, ids) -> str:
    text = "".join(self.decoder[int(i)] for i in ids if int(i) not in (0, self.sot_token, self.eot_token))
    return bytearray(self.byte_decoder[c] for c in text).decode("utf-8", errors="replace").replace("</w>", " ").strip()

  def __call__(self, texts: str | list[str], context_length: int | None = None) -> np.ndarray:
    """(N, context_length) int32 ids: start, tokens, end, zero padding; truncated keeping the end token."""
    if isinstance(texts, str):
      texts = [texts]
    n = context_length or self.context_length
    out = np.zeros((len(texts), n), np.int32)
    for i, text in enumerate(texts):
      ids = [self.sot_token] + self.encode(text) + [self.eot_token]
      if len(ids) > n:
        ids = ids[:n]
        ids[-1] = self.eot_token
      out[i, :len(ids)] = ids
    return out

  def save_hf(self, directory: str | os.PathLike) -> None:
    """Writes vocab.json + merges.txt (the Hugging Face tokenizer files) for this vocabulary."""
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "vocab.json"), "w", encoding="utf-8") as f:
      json.dump(self.encoder, f, ensure_ascii=False)
    merges = sorted(self.bpe_ranks, key=self.bpe_ranks.get)
    with open(os.path.join(directory, "merges.txt"), "w", encoding="utf-8") as f:
      f.write("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")


DEFAULT_BPE = os.path.join(os.path.dirname(os.path.dirname(__file__)), "assets", "bpe_simple_vocab_16e6.txt.gz")


def tokenizer_for(checkpoint: str | None = None, bpe_path: str | None = None) -> Tokenizer:
  """The tokenizer of a checkpoint directory (vocab.json + merges.txt) if it has one, else the BPE file."""
  if checkpoint and os.path.isdir(checkpoint) and os.path.isfile(os.path.join(checkpoint, "vocab.json")):
    return Tokenizer(checkpoint)
  return Tokenizer(bpe_path or DEFAULT_BPE)
