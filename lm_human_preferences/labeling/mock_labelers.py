"""Mock labelers: deterministic programmatic judges standing in for human labelers.

The paper measured sample efficiency with a mock labeler; these play that part offline. A
labeler scores a response's text (the query is given for rules that need it); a best-of-N
label is the response with the highest score, optionally with Boltzmann noise to simulate
human disagreement: P(choose i) ∝ exp(score_i / noise), so noise 0 is a perfect labeler.

- `sentiment`: (positive − negative words) by a small hand-written lexicon.
- `descriptiveness`: adjectives and adverbs (a lexicon, plus -ly/-ful/-ous/-less words).
- `sentiment_distinct`, `descriptiveness_distinct`: the same, but each distinct word counts
  once, so repeating a word earns nothing more: a score that saturates where the counting
  labelers keep rising (for over-optimization studies: bench/paper_findings.py).
"""

import math
import random
import re
from collections.abc import Callable

from lm_human_preferences.utils.errors import UserError

POSITIVE = set("""
love loved loveth lovely joy joyful rejoice rejoiced rejoicing glad gladness peace peaceable blessed bless
blesseth blessing blessings good goodness grace gracious mercy merciful kind kindness comfort comforted hope
faith faithful praise praised glory glorious holy pure righteous righteousness wise wisdom beautiful fair sweet
life light truth true happy pleasant delight salvation saved save heal healed health strength honour precious
gift friend friends rest song sing sang laugh beloved gentle meek clean abundance plenty fruitful bright shine
help helped kiss sweetness feast smile free freedom safe safely delivered deliver hallelujah amen thanks thank
""".split())

NEGATIVE = set("""
evil wicked wickedness sin sins sinned sinner sinners death dead die died dieth slay slain slew kill killed
destroy destroyed destruction wrath anger angry curse cursed hate hated hateth fear feared afraid sorrow sorrows
weep wept mourn mourning pain blood sword war enemy enemies burn burned burnt plague plagues famine darkness
fool foolish iniquity iniquities abomination transgression shame ashamed trouble troubled affliction grief cry
lie lies liar false sick smite smote wound wounded poison vain desolate desolation perish perished dung filthy
vengeance punish punishment judgment torment bitter bitterness captivity prison bondage violence
""".split())

ADJECTIVES = set("""
great good holy white black red green golden fair beautiful strong mighty wise young old new little small high
low deep wide long short dark bright pure precious rich poor sweet bitter clean unclean righteous wicked evil
glad dead living whole large fine fat lean tall broad fierce gentle meek proud humble cold hot hard soft heavy
wild thick secret naked blind lame weary faithful glorious terrible wonderful beloved ancient everlasting
eternal perfect excellent pleasant fruitful barren empty full thirsty hungry sore sharp blue purple scarlet
crimson fiery silent quiet swift slow loud sad merry brave bold weak vast narrow straight crooked smooth rough
""".split())
_DESCRIPTIVE_SUFFIXES = ("ly", "ful", "ous", "less")
_NOT_DESCRIPTIVE = {"only", "fly", "family", "reply", "ply", "supply", "apply", "holy", "lily", "bless", "unless"}
_WORD = re.compile(r"[a-z']+")


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def sentiment(query: str, response: str) -> float:
    """Positive minus negative words in the response."""
    tokens = words(response)
    return float(sum(w in POSITIVE for w in tokens) - sum(w in NEGATIVE for w in tokens))


def _is_descriptive(word: str) -> bool:
    return word in ADJECTIVES or (word.endswith(_DESCRIPTIVE_SUFFIXES) and len(word) > 4 and word not in _NOT_DESCRIPTIVE)


def descriptiveness(query: str, response: str) -> float:
    """Adjectives and adverbs in the response ('holy' counts once, as an adjective)."""
    return float(sum(_is_descriptive(w) for w in words(response)))


def sentiment_distinct(query: str, response: str) -> float:
    """Distinct positive minus distinct negative words in the response."""
    tokens = set(words(response))
    return float(len(tokens & POSITIVE) - len(tokens & NEGATIVE))


def descriptiveness_distinct(query: str, response: str) -> float:
    """Distinct adjectives and adverbs in the response."""
    return float(sum(_is_descriptive(w) for w in set(words(response))))


Labeler = Callable[[str, str], float]
LABELERS: dict[str, Labeler] = {"sentiment": sentiment, "descriptiveness": descriptiveness,
                                "sentiment_distinct": sentiment_distinct,
                                "descriptiveness_distinct": descriptiveness_distinct}


def get(name: str) -> Labeler:
    if name not in LABELERS:
        raise UserError(f"unknown mock labeler {name!r}; known: {', '.join(LABELERS)}")
    return LABELERS[name]


def choose_best(scores: list[float], noise: float, rng: random.Random) -> int:
    """Index of the chosen response: the best (ties broken at random), or Boltzmann-noisy when noise > 0."""
    if noise > 0:
        top = max(scores)
        weights = [math.exp((s - top) / noise) for s in scores]
        return rng.choices(range(len(scores)), weights=weights)[0]
    best = max(scores)
    return rng.choice([i for i, s in enumerate(scores) if s == best])


MOCK_PREFIX = "mock:"


def parse_source(source: str) -> tuple[str, float]:
    """A label source `mock:<labeler>[:<noise>]` → (labeler name, noise)."""
    parts = source[len(MOCK_PREFIX):].split(":")
    try:
        noise = float(parts[1]) if len(parts) > 1 else 0.0
    except ValueError:
        raise UserError(f"{source}: the noise after the labeler name must be a number") from None
    if len(parts) > 2 or not noise >= 0:
        raise UserError(f"{source}: write a mock label source as mock:<labeler> or mock:<labeler>:<noise ≥ 0>")
    get(parts[0])
    return parts[0], noise
