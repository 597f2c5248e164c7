"""s2s_jax.data.moses gives sacremoses' tokens exactly: real text, edge cases, random strings."""

import random
import re

import pytest
import sacremoses

from s2s_jax.data import moses, synthetic

LANGS = ("en", "fr", "de", "it", "cs")

# Pieces chosen to hit every rule: spaces of all kinds and control characters, multidots,
# commas next to digits, apostrophes next to letters, digits and punctuation, nonbreaking
# prefixes followed by lower case, digits or nothing, the DOTMULTI markers themselves.
PIECES = ["a", "b", "Z", "é", "ß", "Ω", "1", "7", "２", "٣", " ", " ", " ", "  ", "\t", "\x01",
          "\n", "\u00a0", "\u2028", "'", "'", "''", ",", ",", ".", ".", "..", "...", "`", '"',
          "-", "--", "!", "?", "(", ")", "«", "»", "$", "€", "%", "/", "&", "<", "@", ":", ";",
          "Mr.", "No.", "Art.", "p.", "U.S.", "etc.", "n't", "'s", "l'", "DOTMULTI", "MULTI",
          "DOT", "x.'", "s", "cannot", "Nr.", "z.B.", "vol.", "#", "™", "٫", "日本"]

EDGE_CASES = [
    "", " ", "\t\n", ".", "..", "'", ",", "a.", "a. b", "Mr. Smith", "No. 5", "No. five", "p. 3",
    "U.S. citizens.", "end.'", "he said 'hi.'", "5,300 and 5, 3 ,x", "1,", "a,", ",a", "x''y",
    "l'homme d'état", "aujourd'hui", "rock 'n' roll", "it's 5 o'clock", "the 1990's", "'tis",
    "wait... what?!", "a....b", "DOTMULTI. DOTDOTMULTI", "a\u00a0b\u2009c", "tab\there",
    "ctrl\x01\x1fchars", "  lead and trail  ", "«Bonjour», dit-il.", "e-mail: x@y.z",
    "3.14 is pi.", "z.B. heute", "Jan. 2014", "Dr.Who", "etc.)", "(a.) b", "A. B. C.",
]


@pytest.fixture(scope="module", params=LANGS)
def pair(request):
  lang = request.param
  return lang, sacremoses.MosesTokenizer(lang=lang), moses.MosesTokenizer(lang)


def _reference(ref, text):
  return ref.tokenize(text, escape=False, aggressive_dash_splits=False)


def test_split_uses_the_whitespace_that_regex_backslash_s_matches():
  every = moses._every_char()
  assert re.findall(r"\s", every) == [c for c in every if c.isspace()]
  # The fast path skips the space passes for printable text: no printable space but " ".
  assert [c for c in every if c.isspace() and c.isprintable()] == [" "]


def test_character_classes_are_read_off_the_compiled_rules():
  alpha, negated = moses._members("[" + sacremoses.MosesTokenizer.IsAlpha + "]")
  assert not negated and {"a", "é", "Ω"} <= alpha and not {"1", "'", " "} & alpha
  digits, negated = moses._members("[^" + sacremoses.MosesTokenizer.IsN + "]")
  assert negated and {"1", "٣", "２"} <= digits and "a" not in digits


def test_edge_cases_match_sacremoses(pair):
  lang, ref, fast = pair
  for text in EDGE_CASES:
    assert fast.tokenize(text) == _reference(ref, text), (lang, text)


def test_embedded_corpus_matches_sacremoses(pair):
  lang, ref, fast = pair
  texts = [t for p in synthetic.generate_pairs(1000, seed=3) for t in p]  # English and French
  assert sum("'" in t for t in texts) > 100 and sum("," in t for t in texts) > 100
  for text in texts:
    assert fast.tokenize(text) == _reference(ref, text), (lang, text)


def test_random_strings_match_sacremoses(pair):
  lang, ref, fast = pair
  rng = random.Random(lang)
  for _ in range(3000):
    text = "".join(rng.choice(PIECES) for _ in range(rng.randint(0, 14)))
    assert fast.tokenize(text) == _reference(ref, text), (lang, text)


def test_a_rule_changed_upstream_is_an_error_not_a_silent_difference():
  bad = re.compile(r"([a])[,]([b])")
  with pytest.raises(RuntimeError, match="does not know"):
    moses._rule(bad, r"\1 , ", "[,]")
