"""CLIP BPE tokenizer: ids equal transformers' CLIPTokenizer (and open_clip's where it imports)."""
from __future__ import annotations

import ftfy
import numpy as np
import pytest

from mediclip_jax.weights.tokenizer import Tokenizer

NORMAL_WORDS = ["normal", "healthy", "negative", "unremarkable", "clear", "asymptomatic", "normal findings",
                "no findings", "in good health", "no evidence of disease"]
ABNORMAL_WORDS = ["abnormal", "positive", "symptomatic", "disease", "lesion", "pathological", "impaired",
                  "evidence of disease", "abnormal finding", "pathological condition", "pathological abnormality"]
PROMPTS = [f"X X X X X X X X {w}." for w in NORMAL_WORDS + ABNORMAL_WORDS]
OTHER = [
    "a photo of a cat", "A chest X-ray with a nodule in the left lower lobe.", "", "   ", "Hello, World!!!",
    "it's, we're, they've, I'm, you'll, he'd", "don't stop", "e-mail: someone@example.com", "#hashtag @user",
    "3.14159 and 42 and 1,000,000", "CT/MRI (T1w, T2w) -- FLAIR?", "naïve café résumé", "Zürich Straße",
    "日本語のテキスト", "中文文本测试", "Ελληνικά κείμενο", "кириллица тест", "emoji 🙂🚀 and ❤️", "tab\tand\nnewline",
    "MiXeD CaSe WoRdS", "multiple     spaces", "quotes “curly” and ‘single’", "em—dash and en–dash", "½ ¼ ² ³ №",
    "pneumothorax, cardiomegaly; effusion: atelectasis.", "<|startoftext|> inside text <|endoftext|>",
    "a b c d e f g h i j k l m n o p q r s t u v w x y z", "...!!!???", "\u00a0non-breaking\u00a0space",
    "ﬁ ligature and ＦＵＬＬＷＩＤＴＨ",
    "long " * 100, "pneumonoultramicroscopicsilicovolcanoconiosis " * 20,
    " ".join(f"token{i}" for i in range(120)), "🙂" * 90,
]
STRINGS = PROMPTS + OTHER


@pytest.fixture(scope="module")
def tokenizer(bpe_path):
  return Tokenizer(bpe_path)


def test_at_least_fifty_strings_cover_prompts_unicode_and_long():
  assert len(STRINGS) >= 50 and len(PROMPTS) == 21


def test_vocabulary_and_special_tokens(tokenizer):
  assert tokenizer.vocab_size == 49408
  assert (tokenizer.sot_token, tokenizer.eot_token) == (49406, 49407)
  ids = tokenizer("X X X X X X X X normal.")[0]
  assert ids.shape == (77,) and ids.dtype == np.int32
  assert list(ids[:9]) == [49406] + [343] * 8  # "x" is 343: the 8 context placeholders X
  assert ids[11] == 49407 and not ids[12:].any()


@pytest.mark.parametrize("word,eot", [("normal", 11), ("unremarkable", 12), ("in good health", 13),
                                      ("asymptomatic", 14), ("pathological abnormality", 15), ("lesion", 12),
                                      ("evidence of disease", 13), ("no evidence of disease", 14)])
def test_eot_positions_match_reference_table(tokenizer, word, eot):
  assert int(np.argmax(tokenizer(f"X X X X X X X X {word}.")[0])) == eot


def test_truncation_keeps_end_token(tokenizer):
  ids = tokenizer("long " * 100)[0]
  assert ids[0] == 49406 and ids[-1] == 49407 and (ids[1:-1] != 0).all()


def test_decode_round_trip(tokenizer):
  assert tokenizer.decode(tokenizer("a chest x-ray, left lobe!")[0]) == "a chest x - ray , left lobe !"  # word ends become spaces, as open_clip decodes


def test_hf_directory_equals_gz(tokenizer, tmp_path):
  tokenizer.save_hf(tmp_path)
  again = Tokenizer(tmp_path)
  np.testing.assert_array_equal(again(STRINGS), tokenizer(STRINGS))


def test_ids_equal_transformers(tokenizer, tmp_path):
  transformers = pytest.importorskip("transformers")
  tokenizer.save_hf(tmp_path)
  hf = transformers.CLIPTokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"))
  ours = tokenizer(STRINGS)
  mismatches = []
  for s, row in zip(STRINGS, ours):
    # OpenAI/open_clip clean text with ftfy (which uncurls quotes); transformers' tokenizers-backed
    # CLIPTokenizer does not. We follow OpenAI, so transformers sees the ftfy-fixed string. Only the
    # curly-quote and ligature/full-width strings are changed by ftfy here (asserted below).
    ref = hf(ftfy.fix_text(s), max_length=77, truncation=True)["input_ids"]
    got = list(row[:len(ref)])
    if got != ref or row[len(ref):].any():
      mismatches.append((s, got[:12], ref[:12]))
  assert not mismatches, mismatches
  assert [s for s in STRINGS if ftfy.fix_text(s) != s] == ["quotes “curly” and ‘single’", "ﬁ ligature and ＦＵＬＬＷＩＤＴＨ"]


def test_ids_equal_open_clip(tokenizer):
  open_clip = pytest.importorskip("open_clip", exc_type=ImportError)
  ref = open_clip.tokenize(STRINGS).numpy()
  np.testing.assert_array_equal(tokenizer(STRINGS), ref)


def test_missing_vocabulary_is_reported(tmp_path):
  with pytest.raises(FileNotFoundError, match="vocab.json"):
    Tokenizer(tmp_path)
  with pytest.raises(FileNotFoundError, match="bpe_simple_vocab"):
    Tokenizer(tmp_path / "nothing.txt")
