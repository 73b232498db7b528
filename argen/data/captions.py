"""Deterministic captions for text-to-image training on Fashion-MNIST.

Fashion-MNIST only has class labels, so text conditioning is synthesised: a template is
filled with one of several synonyms of the class name and, optionally, one attribute that
can be measured from the pixels (``dark`` / ``light``). Using several wordings stops the
generator from keying on one exact string, and the attribute gives a second, checkable
property a prompt can control.

A separate set of *held-out* prompts (other templates, other synonyms) is never produced
by :func:`train_caption`. Evaluating on them measures whether the model follows the
meaning of a prompt rather than memorising the training strings; :func:`all_train_captions`
enumerates the whole training space so tests can prove the two are disjoint.

The rich captions at the end of the file (issue 11) describe garments the way people write
about them; `rich_caption_pool` draws a fixed pool of them for training.

Everything here is pure Python + numpy so captions can be generated without torch.
"""

from __future__ import annotations

import random
import re
from typing import Optional

import numpy as np

# Synonyms used in training captions, one list per Fashion-MNIST label (same order as
# ``fashion_mnist.CLASS_NAMES``). Every entry is a singular noun phrase so that
# "a {x}" reads naturally; trousers therefore appear as "pair of ...".
TRAIN_SYNONYMS: dict[int, tuple[str, ...]] = {
    0: ("t-shirt", "tee", "top", "short-sleeved top"),
    1: ("pair of trousers", "pair of pants", "pair of slacks"),
    2: ("pullover", "sweater", "jumper"),
    3: ("dress", "frock", "one-piece dress"),
    4: ("coat", "jacket", "overcoat"),
    5: ("sandal", "open-toe shoe", "summer sandal"),
    6: ("shirt", "button-up shirt", "blouse"),
    7: ("sneaker", "running shoe", "trainer", "athletic shoe"),
    8: ("bag", "handbag", "purse"),
    9: ("ankle boot", "boot", "short boot"),
}

# Synonyms that only appear in held-out prompts. They stay plain, common English because
# the text encoder is a generic sentence-embedding model: an obscure word would test the
# encoder's vocabulary, not the generator.
HELDOUT_SYNONYMS: dict[int, tuple[str, ...]] = {
    0: ("crew-neck tee", "casual t-shirt"),
    1: ("pair of long pants", "pair of dress trousers"),
    2: ("knitted sweater", "wool jumper"),
    3: ("sleeveless dress", "long dress"),
    4: ("winter coat", "warm jacket"),
    5: ("strappy sandal", "beach sandal"),
    6: ("collared shirt", "long-sleeved shirt"),
    7: ("jogging shoe", "sports shoe"),
    8: ("shoulder bag", "leather handbag"),
    9: ("chelsea boot", "leather ankle boot"),
}

# ``{x}`` is the synonym, ``{attr}`` the measured attribute. Articles are written as "a"
# and corrected afterwards by :func:`fix_articles`.
TRAIN_TEMPLATES: tuple[str, ...] = (
    "{x}",
    "a {x}",
    "a photo of a {x}",
    "a small image of a {x}",
    "a {attr} {x}",
    "a photo of a {attr} {x}",
    "an image of a {x}, {attr}",
    "a {x} in {attr} tones",
)

HELDOUT_TEMPLATES: tuple[str, ...] = (
    "a picture showing someone's {x}",
    "here is a {x}",
    "a close-up shot of a {x}",
    "a {x} on a plain background",
    "a catalog picture featuring a {x}",
    "this is what a {x} looks like",
)

ATTRIBUTES: tuple[str, ...] = ("dark", "light")

# A pixel counts as part of the item (not background) above this level. It drops the faint
# anti-aliased rim so thin items such as sandals are not called "dark" just for their size.
FOREGROUND_LEVEL = 32

# Median, over the 60000 Fashion-MNIST training images, of the mean of the foreground
# pixels (> FOREGROUND_LEVEL); measured once with numpy on the Debian
# `dataset-fashion-mnist` files (median 167.55). With it 49.96% of train and 51.2% of test
# images are "dark", and every class has between 31% and 84% dark items.
DARK_THRESHOLD = 167.5

_VOWEL_SOUND_EXCEPTIONS = ("one", "uni", "use", "eu")


def attribute_for(image_uint8) -> str:
    """Return "dark" or "light" for one uint8 image (numpy array or CPU tensor, any shape).

    Measured on the item only (foreground pixels), so the word describes the garment's
    shade rather than how much of the frame it covers. An all-background image is "dark".
    """
    pixels = np.asarray(image_uint8, dtype=np.float64).ravel()
    foreground = pixels[pixels > FOREGROUND_LEVEL]
    if foreground.size == 0 or foreground.mean() < DARK_THRESHOLD:
        return "dark"
    return "light"


def _starts_with_vowel_sound(word: str) -> bool:
    """Spelling-based guess at a vowel sound; good enough for the fixed vocabulary here."""
    word = word.lower()
    if word.startswith(_VOWEL_SOUND_EXCEPTIONS):
        return False
    return word[:1] in "aeiou"


def fix_articles(text: str) -> str:
    """Turn every "a"/"an" into the right one for the word that follows it."""

    def replace(match: re.Match) -> str:
        article, following = match.group(1), match.group(2)
        wanted = "an" if _starts_with_vowel_sound(following) else "a"
        if article[0].isupper():
            wanted = wanted.capitalize()
        return f"{wanted} {following}"

    return re.sub(r"\b([Aa]n?) ([\w-]+)", replace, text)


def fill(template: str, synonym: str, attribute: str | None = None) -> str:
    """Fill one template; the attribute is only needed if the template mentions it."""
    if "{attr}" in template and attribute is None:
        raise ValueError(f"template {template!r} needs an attribute")
    return fix_articles(template.format(x=synonym, attr=attribute))


def _templates_without_attribute() -> tuple[str, ...]:
    return tuple(t for t in TRAIN_TEMPLATES if "{attr}" not in t)


def train_caption(label: int, image_uint8, rng: random.Random) -> str:
    """Draw one training caption for an item of class ``label``.

    The template and synonym come from ``rng`` (so callers control determinism); the
    attribute is measured from ``image_uint8``. Pass ``image_uint8=None`` when no pixels
    are at hand: only attribute-free templates are used then.
    """
    synonyms = TRAIN_SYNONYMS[int(label)]
    templates = TRAIN_TEMPLATES if image_uint8 is not None else _templates_without_attribute()
    template = rng.choice(templates)
    synonym = rng.choice(synonyms)
    attribute = attribute_for(image_uint8) if "{attr}" in template else None
    return fill(template, synonym, attribute)


def caption_for_name(name: str, rng: random.Random) -> str:
    """Caption a free-form class name (e.g. an image-folder sub-folder) with the templates.

    Used for user datasets where there is no synonym list and no calibrated attribute, so
    only attribute-free training templates apply.
    """
    noun = re.sub(r"[_\s]+", " ", name).strip()
    return fill(rng.choice(_templates_without_attribute()), noun)


def all_train_captions(label: int) -> list[str]:
    """Every caption :func:`train_caption` can return for ``label`` (all attributes included)."""
    captions = set()
    for template in TRAIN_TEMPLATES:
        attributes = ATTRIBUTES if "{attr}" in template else (None,)
        for synonym in TRAIN_SYNONYMS[int(label)]:
            for attribute in attributes:
                captions.add(fill(template, synonym, attribute))
    return sorted(captions)


def _heldout_prompts(label: int) -> list[str]:
    """Pair held-out templates with held-out synonyms, cycling through the synonyms."""
    synonyms = HELDOUT_SYNONYMS[label]
    return [
        fill(template, synonyms[i % len(synonyms)])
        for i, template in enumerate(HELDOUT_TEMPLATES)
    ]


# Evaluation prompts, never produced in training (see tests/test_data.py).
HELDOUT_PROMPTS: dict[int, list[str]] = {label: _heldout_prompts(label) for label in HELDOUT_SYNONYMS}


# --------------------------------------------------------------------------------------------
# Rich captions: how people actually describe clothes.
#
# The basic captions above teach one noun per class in eight fixed frames, and a generator
# conditioned on them follows little else (62% on everyday prompts, issue 11). The rich
# captions below combine many everyday names (singular and plural), colours, materials,
# details, occasions and neutral distractor words in many frames, so the model sees the same
# garment described in many ways. They are drawn into a fixed pool per (class, measured
# shade) so their text features can be computed once before training.

# (singular, plural) everyday names. Footwear and trousers also come as "a pair of ...".
RICH_NOUNS: dict[int, tuple[tuple[str, str], ...]] = {
    0: (("t-shirt", "t-shirts"), ("tee", "tees"), ("tshirt", "tshirts"), ("t shirt", "t shirts"), ("top", "tops"),
        ("tank top", "tank tops"), ("short-sleeved top", "short-sleeved tops"), ("crop top", "crop tops"),
        ("vest top", "vest tops"), ("camisole", "camisoles"), ("singlet", "singlets"), ("graphic tee", "graphic tees"),
        ("short sleeve t-shirt", "short sleeve t-shirts")),
    1: (("pair of trousers", "trousers"), ("pair of pants", "pants"), ("pair of jeans", "jeans"),
        ("pair of slacks", "slacks"), ("pair of chinos", "chinos"), ("pair of leggings", "leggings"),
        ("pair of sweatpants", "sweatpants"), ("pair of joggers", "joggers"), ("pair of khakis", "khakis"),
        ("pair of track pants", "track pants"), ("pair of cargo pants", "cargo pants"),
        ("pair of denim jeans", "denim jeans"), ("pair of suit trousers", "suit trousers")),
    2: (("pullover", "pullovers"), ("sweater", "sweaters"), ("jumper", "jumpers"), ("sweatshirt", "sweatshirts"),
        ("hoodie", "hoodies"), ("turtleneck", "turtlenecks"), ("knit sweater", "knit sweaters"),
        ("knitted jumper", "knitted jumpers"), ("fleece top", "fleece tops"), ("crewneck sweater", "crewneck sweaters"),
        ("long-sleeved knit top", "long-sleeved knit tops"), ("woolly jumper", "woolly jumpers")),
    3: (("dress", "dresses"), ("frock", "frocks"), ("gown", "gowns"), ("sundress", "sundresses"),
        ("maxi dress", "maxi dresses"), ("mini dress", "mini dresses"), ("shift dress", "shift dresses"),
        ("cocktail dress", "cocktail dresses"), ("evening dress", "evening dresses"), ("party dress", "party dresses"),
        ("summer dress", "summer dresses"), ("slip dress", "slip dresses"), ("ball gown", "ball gowns")),
    4: (("coat", "coats"), ("jacket", "jackets"), ("overcoat", "overcoats"), ("parka", "parkas"),
        ("trench coat", "trench coats"), ("raincoat", "raincoats"), ("anorak", "anoraks"),
        ("puffer jacket", "puffer jackets"), ("windbreaker", "windbreakers"), ("peacoat", "peacoats"),
        ("bomber jacket", "bomber jackets"), ("down jacket", "down jackets"), ("rain jacket", "rain jackets"),
        ("zip-up jacket", "zip-up jackets")),
    5: (("sandal", "sandals"), ("flip-flop", "flip-flops"), ("flip flop", "flip flops"), ("slide", "slides"),
        ("heeled sandal", "heeled sandals"), ("open-toe shoe", "open-toe shoes"), ("summer sandal", "summer sandals"),
        ("slingback", "slingbacks"), ("wedge sandal", "wedge sandals"), ("thong sandal", "thong sandals"),
        ("strappy shoe", "strappy shoes"), ("gladiator sandal", "gladiator sandals"), ("pool slide", "pool slides")),
    6: (("shirt", "shirts"), ("button-up shirt", "button-up shirts"), ("button-down shirt", "button-down shirts"),
        ("blouse", "blouses"), ("dress shirt", "dress shirts"), ("flannel shirt", "flannel shirts"),
        ("oxford shirt", "oxford shirts"), ("check shirt", "check shirts"), ("plaid shirt", "plaid shirts"),
        ("work shirt", "work shirts"), ("formal shirt", "formal shirts"), ("denim shirt", "denim shirts"),
        ("linen shirt", "linen shirts")),
    7: (("sneaker", "sneakers"), ("trainer", "trainers"), ("running shoe", "running shoes"),
        ("athletic shoe", "athletic shoes"), ("tennis shoe", "tennis shoes"), ("gym shoe", "gym shoes"),
        ("basketball shoe", "basketball shoes"), ("canvas sneaker", "canvas sneakers"), ("runner", "runners"),
        ("training shoe", "training shoes"), ("skate shoe", "skate shoes"), ("low-top sneaker", "low-top sneakers"),
        ("lace-up sneaker", "lace-up sneakers"), ("sports sneaker", "sports sneakers")),
    8: (("bag", "bags"), ("handbag", "handbags"), ("purse", "purses"), ("tote", "totes"), ("tote bag", "tote bags"),
        ("backpack", "backpacks"), ("rucksack", "rucksacks"), ("clutch", "clutches"), ("satchel", "satchels"),
        ("messenger bag", "messenger bags"), ("shopping bag", "shopping bags"), ("briefcase", "briefcases"),
        ("crossbody bag", "crossbody bags"), ("duffel bag", "duffel bags"), ("pouch", "pouches")),
    9: (("ankle boot", "ankle boots"), ("boot", "boots"), ("short boot", "short boots"), ("bootie", "booties"),
        ("combat boot", "combat boots"), ("hiking boot", "hiking boots"), ("work boot", "work boots"),
        ("heeled boot", "heeled boots"), ("cowboy boot", "cowboy boots"), ("winter boot", "winter boots"),
        ("desert boot", "desert boots"), ("lace-up boot", "lace-up boots"), ("ankle-high boot", "ankle-high boots")),
}

_PAIRED = (5, 7, 9)  # footwear: "a pair of sneakers"

RICH_COLOURS = ("black", "white", "grey", "gray", "navy", "blue", "red", "green", "beige", "brown", "pink",
                "yellow", "cream", "olive", "khaki", "burgundy", "purple", "orange", "charcoal", "pale")
RICH_PATTERNS = ("striped", "plain", "floral", "checked", "patterned", "polka dot", "two-tone", "printed", "faded")
RICH_MATERIALS: dict[int, tuple[str, ...]] = {
    0: ("cotton", "jersey", "linen", "polyester"),
    1: ("denim", "cotton", "corduroy", "linen", "wool", "stretch"),
    2: ("wool", "cashmere", "knitted", "fleece", "cotton", "merino"),
    3: ("silk", "cotton", "satin", "lace", "linen", "velvet", "chiffon"),
    4: ("wool", "leather", "denim", "quilted", "waterproof", "padded", "suede"),
    5: ("leather", "rubber", "suede", "plastic", "woven"),
    6: ("cotton", "linen", "flannel", "denim", "silk", "poplin"),
    7: ("canvas", "leather", "mesh", "suede", "knit"),
    8: ("leather", "canvas", "suede", "nylon", "straw", "fabric"),
    9: ("leather", "suede", "rubber", "waterproof"),
}
RICH_DETAILS: dict[int, tuple[str, ...]] = {
    0: ("short sleeves", "a round neck", "a v-neck", "a logo on the front", "a print", "no sleeves", "a pocket"),
    1: ("pockets", "a belt", "straight legs", "wide legs", "a zip fly", "turned-up hems", "a drawstring waist"),
    2: ("long sleeves", "a hood", "ribbed cuffs", "a high neck", "a cable knit pattern", "a round collar"),
    3: ("thin straps", "a flared skirt", "short sleeves", "a belt", "a high waist", "no sleeves", "a long skirt"),
    4: ("a hood", "a zip", "buttons", "a belt", "big pockets", "a fur collar", "long sleeves"),
    5: ("thin straps", "a buckle", "a heel", "a flat sole", "a toe post", "an ankle strap"),
    6: ("a collar", "buttons", "long sleeves", "a chest pocket", "cuffs", "rolled-up sleeves"),
    7: ("laces", "a thick sole", "a white sole", "a stripe on the side", "a padded collar", "a rubber toe cap"),
    8: ("handles", "a long strap", "a zip", "a buckle", "a clasp", "two straps", "a flap"),
    9: ("a heel", "a zip on the side", "laces", "a block heel", "elastic sides", "a thick sole", "a buckle"),
}
RICH_OCCASIONS = ("work", "the office", "the weekend", "a party", "summer", "winter", "autumn", "spring",
                  "everyday wear", "travel", "school", "the gym", "a night out", "a wedding", "the holidays",
                  "a walk in the park", "cold weather", "warm days", "a rainy day", "a date")
# Neutral words that describe the photo, not the item: the model should learn to ignore them.
RICH_DISTRACTORS = ("on a table", "on the floor", "on a hanger", "in a shop window", "in the morning light",
                    "photographed from above", "hanging on a rail", "in a wardrobe", "on a bed", "by the door",
                    "in a suitcase", "at a market stall", "folded neatly", "seen from the side", "in a box",
                    "next to a window", "in black and white", "in soft light")
RICH_FRAMES = (
    "{np}",
    "{np}",
    "a photo of {np}",
    "an image of {np}",
    "a picture of {np}",
    "a drawing of {np}",
    "a grayscale photo of {np}",
    "a low resolution photo of {np}",
    "a studio shot of {np}",
    "a fashion catalogue image of {np}",
    "show me {np}",
    "generate {np}",
    "draw {np}",
    "i want {np}",
    "looking for {np}",
    "{np} for sale",
    "{np}, studio lighting",
    "{np} on a white background",
    "an online shop photo of {np}",
    "a thumbnail of {np}",
)


def _rich_noun_phrase(label: int, rng: random.Random, shade: Optional[str]) -> str:
    singular, plural = rng.choice(RICH_NOUNS[label])
    words = []
    if rng.random() < 0.5:
        kind = rng.random()
        if kind < 0.4:
            words.append(rng.choice(RICH_COLOURS))
        elif kind < 0.6:
            words.append(rng.choice(RICH_PATTERNS))
        elif kind < 0.8:
            words.append(rng.choice(RICH_MATERIALS[label]))
        elif shade is not None:
            words.append(shade)
        if rng.random() < 0.25:
            words.append(rng.choice(RICH_MATERIALS[label]))
    adjectives = " ".join(dict.fromkeys(words))  # no "wool wool"
    if adjectives and singular.startswith("pair of "):  # "a pair of black jeans", not "a black pair of jeans"
        noun = "pair of " + adjectives + " " + singular[len("pair of "):]
    else:
        noun = " ".join(filter(None, (adjectives, singular)))
    number = rng.random()
    if number < 0.55:
        phrase = "a " + noun
    elif number < 0.8:
        phrase = " ".join(filter(None, (adjectives, plural)))
    elif number < 0.9:
        phrase = rng.choice(("two ", "some ", "three ", "a few ")) + " ".join(filter(None, (adjectives, plural)))
    elif label in _PAIRED:
        phrase = "a pair of " + " ".join(filter(None, (adjectives, plural)))
    else:
        phrase = "the " + noun
    extra = rng.random()
    if extra < 0.25:
        phrase += " with " + rng.choice(RICH_DETAILS[label])
    elif extra < 0.4:
        phrase += " for " + rng.choice(RICH_OCCASIONS)
    elif extra < 0.5:
        phrase += " " + rng.choice(RICH_DISTRACTORS)
    elif extra < 0.55:
        phrase += ", " + rng.choice(RICH_COLOURS)
    return phrase


def rich_caption(label: int, shade: Optional[str], rng: random.Random) -> str:
    """One rich caption for class `label`; `shade` ("dark"/"light" measured by `attribute_for`,
    or None) may appear as an adjective."""
    text = rng.choice(RICH_FRAMES).format(np=_rich_noun_phrase(int(label), rng, shade))
    if rng.random() < 0.15:
        text = text.capitalize()
    return fix_articles(text)


def _evaluation_prompts() -> set:
    """Every evaluation prompt (the held-out file and `HELDOUT_PROMPTS`), lower-cased."""
    import json
    from pathlib import Path

    prompts = {p.lower() for ps in HELDOUT_PROMPTS.values() for p in ps}
    for line in (Path(__file__).with_name("prompts_heldout.jsonl")).read_text().splitlines():
        if line.strip():
            prompts.add(json.loads(line)["prompt"].lower())
    return prompts


def rich_caption_pool(per_group: int, seed: int = 0) -> dict:
    """``{(label, shade): [captions]}``: `per_group` distinct rich captions per class and shade.

    Captions that equal an evaluation prompt, or contain a `HELDOUT_SYNONYMS` phrase, are
    dropped, so evaluation stays held out whatever the draw produced.
    """
    banned = _evaluation_prompts()
    heldout_words = [s for syns in HELDOUT_SYNONYMS.values() for s in syns]
    pool = {}
    for label in RICH_NOUNS:
        for shade in ATTRIBUTES:
            rng = random.Random(f"argen-rich:{seed}:{label}:{shade}")
            found: dict = {}
            for _ in range(per_group * 50):
                if len(found) == per_group:
                    break
                text = rich_caption(label, shade, rng)
                low = text.lower()
                if low in banned or any(word in low for word in heldout_words):
                    continue
                found.setdefault(text, None)
            pool[(label, shade)] = list(found)
    return pool
