"""Tests for the embedded English -> French synthetic corpus."""

from __future__ import annotations

import random
import re
import statistics

import pytest

from s2s_jax.data import synthetic as syn
from s2s_jax.data.synthetic import (
    NP,
    Clause,
    analysis_phrases,
    generate_pairs,
    make_split,
    make_splits,
    realize,
    translate_phrase,
)

# Hand-checked pairs (seed 2024): the French was read and verified word by word.
PINNED_2024 = [
    ("This brave daughter understands the artist.", "Cette fille courageuse comprend l'artiste."),
    ("This lion eats.", "Ce lion mange."),
    (
        "He was in the kitchens, but Sophie visited three hotels that he admires behind Lucas next "
        "to his waitress with a brother of a friend.",
        "Il était dans les cuisines, mais Sophie a visité trois hôtels qu'il admire derrière Lucas "
        "à côté de sa serveuse avec un frère d'un ami.",
    ),
    (
        "Nina admires a cook who left and the curious owner was not funny.",
        "Nina admire un cuisinier qui est parti et le propriétaire curieux n'était pas drôle.",
    ),
    ("Oscar was behind Thomas.", "Oscar était derrière Thomas."),
    (
        "A cow behind a woman was funny and the huge donkey is bought by my baker at night.",
        "Une vache derrière une femme était drôle et l'âne énorme est acheté par mon "
        "boulanger la nuit.",
    ),
    ("Eva loses a gift in front of a student.", "Eva perd un cadeau devant un étudiant."),
    ("The waiter meets a wife.", "Le serveur rencontre une femme."),
    (
        "Two butterflies were washed under two good tables this morning because the strong child "
        "believes that their curious dog listens to the beautiful Italian farmer that a soldier "
        "pushed yesterday evening.",
        "Deux papillons ont été lavés sous deux bonnes tables ce matin parce que l'enfant fort "
        "croit que leur chien curieux écoute le beau fermier italien qu'un soldat a poussé "
        "hier soir.",
    ),
    (
        "The farmer is kissed by some furious princesses on a bridge because this beautiful man "
        "did not dream of these kind students who were called near their cave.",
        "Le fermier est embrassé par des princesses furieuses sur un pont parce que ce bel homme "
        "n'a pas rêvé de ces étudiants gentils qui ont été appelés près de leur grotte.",
    ),
]


@pytest.fixture(scope="module")
def corpus() -> list[tuple[str, str]]:
    return generate_pairs(100_000, seed=123)


@pytest.fixture(scope="module")
def sample(corpus) -> list[tuple[str, str]]:
    return corpus[:6000]


# ---------------------------------------------------------------------------
# French surface analysis built from the lexicon (independent of the realiser)
# ---------------------------------------------------------------------------

VOWELS = set("aâàäeéèêëiîïoôöœuûùühAÂÀEÉÈÊIÎOÔŒUÛH")


def fr_tokens(text: str) -> list[str]:
    text = text.rstrip(".").replace(",", " ")
    out = []
    for w in text.split():
        if "'" in w and w != "aujourd'hui":
            head, tail = w.split("'", 1)
            out.extend([head + "'", tail])
        else:
            out.append(w)
    return out


def _analyses() -> tuple[dict, dict]:
    nouns: dict[str, set] = {}
    for n in syn.NOUNS:
        nouns.setdefault(n.fr, set()).add((n.gender, "sg"))
        nouns.setdefault(n.fr_pl, set()).add((n.gender, "pl"))
    # nouns of the time expressions
    for w, gn in [("jours", ("m", "pl")), ("matins", ("m", "pl")), ("soirs", ("m", "pl")),
                  ("semaines", ("f", "pl")), ("nuit", ("f", "sg")), ("semaine", ("f", "sg")),
                  ("année", ("f", "sg")), ("dimanche", ("m", "sg")), ("matin", ("m", "sg"))]:
        nouns.setdefault(w, set()).add(gn)
    adjs: dict[str, set] = {}
    for a in syn.ADJECTIVES:
        for gn, form in a.forms.items():
            adjs.setdefault(form, set()).add(gn)
        if a.ms_vowel:
            adjs.setdefault(a.ms_vowel, set()).add(("m", "sg"))
    return nouns, adjs


NOUN_GN, ADJ_GN = _analyses()
PRE_ADJ_GN = {f: gn for f, gn in ADJ_GN.items()
              if f not in NOUN_GN and any(f in (a.ms_vowel, *a.forms.values())
                                           for a in syn.ADJECTIVES if a.cls == "pre")}
NOMINAL_GN = {w: NOUN_GN.get(w, set()) | ADJ_GN.get(w, set()) for w in set(NOUN_GN) | set(ADJ_GN)}

FEM_SG_DETS = {"la", "une", "cette", "ma", "sa"}
MASC_SG_DETS = {"le", "un", "ce", "cet", "du", "au"}
POSS_SG_DETS = {"mon", "son"}  # masculine, or feminine before a vowel
PL_DETS = {"les", "des", "ces", "mes", "ses", "nos", "leurs", "aux", "deux", "trois"}


def check_french(fr: str) -> list[str]:
    """Return a list of agreement / orthography violations found in one sentence."""
    errors = []
    t = fr_tokens(fr)
    for i, w in enumerate(t[:-1]):
        nxt = t[i + 1]
        vowel = nxt[0] in VOWELS
        lw = w.lower()
        if lw in {"le", "la", "de", "que", "ne", "je", "ce", "ma", "sa"} and vowel:
            errors.append(f"missing elision/cet/mon: {w} {nxt}")
        if lw.endswith("'") and not vowel:
            errors.append(f"elision before consonant: {w}{nxt}")
        if lw in {"vieux", "beau", "nouveau"} and vowel and NOUN_GN.get(nxt) == {("m", "sg")}:
            errors.append(f"should be vieil/bel/nouvel: {w} {nxt}")
        if (lw in {"vieil", "bel", "nouvel"}
                and not (vowel and ("m", "sg") in NOUN_GN.get(nxt, set()))):
            errors.append(f"vieil/bel/nouvel misused: {w} {nxt}")
        if (lw, nxt) in {("à", "le"), ("à", "les"), ("de", "le"), ("de", "les"), ("de", "des"),
                         ("de", "de")}:
            errors.append(f"missing contraction: {w} {nxt}")
        gn = NOMINAL_GN.get(nxt)
        if lw in FEM_SG_DETS and (gn is None or ("f", "sg") not in gn):
            errors.append(f"feminine singular expected after {w}: {nxt}")
        if lw in MASC_SG_DETS and (gn is None or ("m", "sg") not in gn):
            errors.append(f"masculine singular expected after {w}: {nxt}")
        if lw in POSS_SG_DETS and (gn is None
                                   or not (("m", "sg") in gn or (("f", "sg") in gn and vowel))):
            errors.append(f"bad {w} {nxt}")
        if lw in PL_DETS and (gn is None or not any(n == "pl" for _, n in gn)):
            errors.append(f"plural expected after {w}: {nxt}")
        if lw == "l'" and (gn is None or not any(n == "sg" for _, n in gn)):
            errors.append(f"singular expected after l': {nxt}")
        # adjective <-> noun agreement (pre- and post-nominal)
        if w in NOUN_GN and nxt in ADJ_GN and nxt not in NOUN_GN:
            if not NOUN_GN[w] & ADJ_GN[nxt]:
                errors.append(f"noun/adjective disagree: {w} {nxt}")
        if w in PRE_ADJ_GN and nxt in NOUN_GN and i > 0 and t[i - 1].lower() not in {
                "est", "sont", "était", "étaient", "suis", "sommes", "étais", "étions", "pas",
                "souvent", "toujours"}:
            if not ADJ_GN[w] & NOUN_GN[nxt]:
                errors.append(f"adjective/noun disagree: {w} {nxt}")
    negs = sum(1 for w in t if w.lower() in ("ne", "n'"))
    if negs != t.count("pas"):
        errors.append("ne/n' not paired with pas")
    for i, w in enumerate(t):
        if w.lower() in ("ne", "n'") and "pas" not in t[i + 1:i + 4]:
            errors.append("ne without a following pas")
    return errors


# ---------------------------------------------------------------------------
# Determinism and pinned output
# ---------------------------------------------------------------------------


def test_pinned_pairs():
    assert generate_pairs(len(PINNED_2024), seed=2024) == PINNED_2024


def test_determinism():
    a = generate_pairs(300, seed=7)
    assert a == generate_pairs(300, seed=7)
    assert a != generate_pairs(300, seed=8)
    # no hidden global state: drawing from the global random module changes nothing
    random.seed(0)
    random.random()
    assert a == generate_pairs(300, seed=7)


def test_format(sample):
    for en, fr in sample:
        for s in (en, fr):
            assert s[0].isupper() and s.endswith(".") and not s.endswith("..")
            assert "  " not in s and " ," not in s and " ." not in s
        assert "' " not in fr


# ---------------------------------------------------------------------------
# Agreement and orthography
# ---------------------------------------------------------------------------


def test_checker_can_fail():
    """The surface checker must reject typical mistakes."""
    bad = [
        "Le homme voit la chien.",
        "John voit les chat.",
        "La femme ne voit le chien.",
        "John parle à le garçon.",
        "Une voiture rouges arrive.",
        "Le vieux homme dort.",
        "Ma école est grande.",
        "Ce arbre tombe.",
        "Les petits filles dorment.",
    ]
    for s in bad:
        assert check_french(s), s
    good = [
        "L'homme voit la souris.",
        "Le vieil homme ne voit pas mon école.",
        "John parle au garçon et aux filles.",
        "Cet arbre tombe près de la rivière.",
    ]
    for s in good:
        assert not check_french(s), (s, check_french(s))


def test_surface_agreement(sample):
    failures = []
    for en, fr in sample:
        errs = check_french(fr)
        if errs:
            failures.append((en, fr, errs))
    assert not failures, failures[:5]


def test_english_surface(sample):
    for en, _ in sample:
        words = en.rstrip(".").replace(",", "").split()
        for w, nxt in zip(words, words[1:]):
            if w == "a":
                assert nxt[0].lower() not in "aeiou", en
            if w == "an":
                assert nxt[0].lower() in "aeiou", en


def test_negated_indefinite_object_becomes_de(sample):
    n = 0
    for en, fr in sample:
        if re.search(r"\b(does|do|did) not (often |always )?\w+ (a|an|any) ", en):
            n += 1
    assert n > 20
    assert not any(re.search(r"\b(ne|n')\s*\w+ pas (souvent |toujours )?(un|une|des) ", fr)
                   for _, fr in sample)


def _simple_np(rng: random.Random, tags: frozenset) -> NP:
    r = rng.random()
    if r < 0.25 and "P" in tags:
        return NP("name", rng.choice(syn.NAMES))
    if r < 0.4 and "P" in tags:
        return NP("pron", rng.choice(syn.PRONOUNS))
    noun = rng.choice([n for n in syn.NOUNS if n.tags & tags])
    return NP("noun", noun, rng.choice(["sg", "pl"]), rng.choice(["def", "indef", "dem", "my"]))


def _expected_feats(np: NP) -> tuple[str, str]:
    if np.kind == "name":
        return np.head.gender, "sg"
    if np.kind == "pron":
        return np.head.gender, np.head.number
    return np.head.gender, np.number


def _agree(masc_sg: str, gender: str, number: str) -> str:
    suffix = {("m", "sg"): "", ("f", "sg"): "e", ("f", "pl"): "es",
              ("m", "pl"): "" if masc_sg.endswith("s") else "s"}[gender, number]
    return masc_sg + suffix


def _word_after(tokens: list[str], anchors: set) -> str:
    for i, w in enumerate(tokens):
        if w in anchors:
            j = i + 1
            while tokens[j] in ("pas", "souvent", "toujours", "été"):
                j += 1
            return tokens[j]
    raise AssertionError(tokens)


def test_passive_participle_agrees_with_subject():
    rng = random.Random(0)
    passives = [v for v in syn.VERBS if v.passive]
    for _ in range(2000):
        v = rng.choice(passives)
        subj = _simple_np(rng, v.obj)
        tense = rng.choice(["pres", "past"])
        c = Clause("verb", _simple_np(rng, v.subj), v, obj=subj, tense=tense,
                   neg=rng.random() < 0.3, passive=True, show_agent=rng.random() < 0.7)
        en, fr = realize(c)
        g, n = _expected_feats(subj)
        tokens = fr_tokens(fr)
        anchors = ({"a", "ont", "ai", "avons"} if tense == "past"
                   else {"est", "sont", "suis", "sommes"})
        assert _word_after(tokens, anchors) == _agree(v.fr_pp, g, n), (en, fr)
        assert (" by " in en) == ("par" in tokens)


def test_etre_verbs_agree_in_past():
    rng = random.Random(1)
    etre = [v for v in syn.VERBS if v.aux == "etre" and v.frame == "i"]
    assert {v.en[0] for v in etre} >= {"arrive", "leave", "come", "fall"}
    for _ in range(1000):
        v = rng.choice(etre)
        subj = _simple_np(rng, v.subj)
        c = Clause("verb", subj, v, tense="past", neg=rng.random() < 0.5)
        en, fr = realize(c)
        g, n = _expected_feats(subj)
        assert (_word_after(fr_tokens(fr), {"est", "sont", "suis", "sommes"})
                == _agree(v.fr_pp, g, n)), fr


def test_object_relative_participle_agrees_with_antecedent():
    """la lettre que John a ecrite: avoir agrees with the preceding direct object."""
    write = next(v for v in syn.VERBS if v.key == "write/t")
    see = next(v for v in syn.VERBS if v.key == "see/t")
    rng = random.Random(2)
    for _ in range(500):
        verb = rng.choice([write, see])
        head = _simple_np(rng, verb.obj)
        if head.kind != "noun":
            continue
        rel = syn.Rel("obj", Clause("verb", NP("name", syn.NAMES[0]), verb, obj=None, tense="past"))
        head.rel = rel
        en, fr = realize(Clause("cop_adj", head, adj=syn.ADJECTIVES[0]))
        g, n = _expected_feats(head)
        tokens = fr_tokens(fr)
        assert tokens[tokens.index("John") + 2] == _agree(verb.fr_pp, g, n), fr
        # the copula adjective agrees with the same head noun
        assert tokens[-1] == syn.ADJECTIVES[0].forms[g, n], fr


# ---------------------------------------------------------------------------
# Splits and length distribution
# ---------------------------------------------------------------------------


def test_splits():
    s = make_splits(3000, 300, 400, seed=5)
    assert [len(s[k]) for k in ("train", "valid", "test")] == [3000, 300, 400]
    en = [e for k in s for e, _ in s[k]]
    assert len(set(en)) == len(en)
    assert s == make_splits(3000, 300, 400, seed=5)
    assert s["test"] != make_splits(3000, 300, 400, seed=6)["test"]
    # valid/test do not depend on the train size
    s2 = make_splits(1000, 300, 400, seed=5)
    assert s2["test"] == s["test"] and s2["valid"] == s["valid"]
    assert set(s2["train"]) <= set(s["train"])
    # one split alone is the same as in the whole draw
    for k in s:
        assert make_split(k, 3000, 300, 400, seed=5) == s[k]


def test_length_distribution(corpus):
    lengths = [len(en.split()) for en, _ in corpus]
    assert min(lengths) >= 3
    assert 10 <= statistics.median(lengths) <= 20
    assert sum(n >= 50 for n in lengths) >= 50
    assert max(lengths) <= 200


# ---------------------------------------------------------------------------
# translate_phrase and analysis phrases
# ---------------------------------------------------------------------------


def test_translate_phrase_roundtrip(sample):
    for en, fr in sample[:1500]:
        assert translate_phrase(en) == fr, en


def test_translate_phrase_examples():
    assert translate_phrase("The old man sees the dog.") == "Le vieil homme voit le chien."
    assert translate_phrase("the old man") == "le vieil homme"
    assert (translate_phrase("Mary was not seen by the children.")
            == "Mary n'a pas été vue par les enfants.")
    assert (translate_phrase("The letter that John wrote is long.")
            == "La lettre que John a écrite est longue.")
    assert translate_phrase("John does not buy any apples.") == "John n'achète pas de pommes."
    with pytest.raises(ValueError):
        translate_phrase("Colorless green ideas sleep furiously.")


def test_analysis_phrases():
    phrases = analysis_phrases()
    groups = {p["group"] for p in phrases}
    assert 8 <= len(groups) <= 12
    assert {p["kind"] for p in phrases} == {"base", "voice", "order", "order_voice"}
    for p in phrases:
        assert set(p) >= {"en", "fr", "group", "kind"}
        assert translate_phrase(p["en"]) == p["fr"]
        assert not check_french(p["fr"]), p
    assert {"en": "John admires Mary.", "fr": "John admire Mary.", "group": "John admires Mary",
            "kind": "base"}.items() <= phrases[0].items()
    by = {(p["group"], p["kind"]): p for p in phrases}
    for g in groups:
        base, voice, order = by[g, "base"], by[g, "voice"], by[g, "order"]
        # a voice pair keeps the meaning, an order swap changes it
        assert (base["meaning"] == voice["meaning"] != order["meaning"]
                == by[g, "order_voice"]["meaning"])
        # the order swap exchanges the agent with the patient (or the recipient)
        args = base["meaning"][base["meaning"].index("(") + 1:-1].split(", ")
        swapped = [args[1], args[0]] if len(args) == 2 else [args[2], args[1], args[0]]
        assert order["meaning"].endswith("(" + ", ".join(swapped) + ")")
        assert " by " in voice["en"] and " par " in voice["fr"]
    assert by["John admires Mary", "voice"]["fr"] == "Mary est admirée par John."
    assert (by["The boy followed the girls", "voice"]["fr"]
            == "Les filles ont été suivies par le garçon.")
