"""Data: built-in corpora and tasks, user files, splits, token streams and batches.

Nothing here downloads anything. The built-in data is *generated* from small template
grammars driven by a seeded pseudo-random generator written out below (SplitMix64), so
the same seed gives the same text, byte for byte, on every machine, Python and NumPy
version. Two kinds of data come out:

- a **text corpus**: one ``str``; documents are separated by the end-of-text marker
  ``<|endoftext|>``, which every minilora tokenizer encodes as its single ``eot_id``
  token (as GPT-2's training data does). Used for pre-training and for plain-text
  fine-tuning;
- **examples**: a list of ``{"prompt": str, "response": str}``. Used for instruction
  fine-tuning, where only the response tokens count in the loss, and for exact-match
  scoring.

Built-in datasets (see ``BUILTIN_DATASETS`` and :func:`load_builtin`):

===========  ========  ==============================================================
name         kind      what
===========  ========  ==============================================================
stories      text      base corpus: short everyday children's stories (TinyStories-
                       like); no digits, no cooking words. 300k characters by default.
recipes      text      fine-tuning: cooking recipes with a title, servings line,
                       "Ingredients:" list with quantities and a numbered "Method:".
                       A different vocabulary and layout from the stories.
addition     examples  fine-tuning task: ``"12+35="`` -> ``"47"`` (operands 0..99).
reverse      examples  fine-tuning task: ``"reverse pakor ="`` -> ``" rokap"``.
===========  ========  ==============================================================

Letters used for shapes in this file: B batch size, T sequence length (block size).
The token ids returned are NumPy ``int64`` arrays; the training loop moves them to the
device. ``IGNORE_INDEX`` (-100) marks targets that add nothing to the loss.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np

from .tokenizer import EOT

IGNORE_INDEX = -100

Example = Dict[str, str]   # {"prompt": str, "response": str}


# =========================================================================== randomness


class SplitMix64:
    """A tiny, fully specified pseudo-random generator (Steele, Lea & Flood 2014).

    Used instead of ``random`` or ``numpy.random`` for generating the built-in data,
    because its output is fixed by these few lines: no library version can change the
    corpus. (For batching, where only reproducibility within one run matters, minilora
    uses NumPy's ``Generator``.)
    """

    _MASK = (1 << 64) - 1

    def __init__(self, seed: int):
        self.state = int(seed) & self._MASK

    def next64(self) -> int:
        self.state = (self.state + 0x9E3779B97F4A7C15) & self._MASK
        z = self.state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & self._MASK
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & self._MASK
        return z ^ (z >> 31)

    def below(self, n: int) -> int:
        """An integer in [0, n). (Modulo bias is below 2**-50 for the n used here.)"""
        return self.next64() % n

    def between(self, lo: int, hi: int) -> int:
        """An integer in [lo, hi], both ends included."""
        return lo + self.below(hi - lo + 1)

    def choice(self, seq):
        return seq[self.below(len(seq))]

    def chance(self, p: float) -> bool:
        return self.next64() < int(p * (1 << 64))

    def shuffle(self, items: list) -> None:
        """Fisher-Yates, in place."""
        for i in range(len(items) - 1, 0, -1):
            j = self.below(i + 1)
            items[i], items[j] = items[j], items[i]


def _rng_for(name: str, seed: int) -> SplitMix64:
    """Each dataset gets its own stream, so seed 0 of two datasets is unrelated."""
    tag = 0
    for ch in name.encode("utf-8"):
        tag = (tag * 131 + ch) & SplitMix64._MASK
    return SplitMix64((tag << 1) ^ (int(seed) * 0x2545F4914F6CDD1D))


def _join_documents(rng: SplitMix64, make_document: Callable[[SplitMix64], str], n_chars: int) -> str:
    """Generate documents until the corpus holds ``n_chars`` characters, joined by EOT.

    The result is exactly ``n_chars`` long: the last document is cut off mid-way (as a
    fixed-size slice of any real corpus would be).
    """
    if n_chars < 1:
        raise ValueError(f"n_chars must be positive, got {n_chars}")
    parts, total = [], 0
    while total < n_chars:
        doc = make_document(rng)
        if parts:
            parts.append(EOT)
            total += len(EOT)
        parts.append(doc)
        total += len(doc)
    return "".join(parts)[:n_chars]


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


# =========================================================================== stories
# A character is (name, description, he/she/it, him/her/it, his/her/its).

_PEOPLE = [
    ("Lily", "a little girl", "she"), ("Tom", "a little boy", "he"), ("Mia", "a kind girl", "she"),
    ("Ben", "a curious boy", "he"), ("Sara", "a brave girl", "she"), ("Leo", "a shy boy", "he"),
    ("Anna", "a happy girl", "she"), ("Sam", "a funny boy", "he"), ("Zoe", "a clever girl", "she"),
    ("Jack", "a busy boy", "he"), ("Lucy", "a quiet girl", "she"), ("Finn", "a small boy", "he"),
    ("Rosa", "a cheerful girl", "she"), ("Omar", "a gentle boy", "he"), ("Nina", "a playful girl", "she"),
    ("Theo", "a sleepy boy", "he"), ("Ivy", "a smart girl", "she"), ("Kai", "a fast boy", "he"),
    ("Ella", "a friendly girl", "she"), ("Max", "a strong boy", "he"),
]
_ANIMALS = [
    ("Spot", "a little dog", "he"), ("Mittens", "a soft cat", "she"), ("Hop", "a brown bunny", "he"),
    ("Bruno", "a big bear", "he"), ("Pip", "a tiny bird", "she"), ("Freddy", "a green frog", "he"),
    ("Daisy", "a white duck", "she"), ("Nutty", "a red squirrel", "he"), ("Luna", "a gray owl", "she"),
    ("Rex", "a friendly dragon", "he"), ("Bella", "a young horse", "she"), ("Tiny", "a slow turtle", "he"),
]
_PRONOUNS = {"he": ("he", "him", "his"), "she": ("she", "her", "her")}

_OPENINGS = [
    "Once upon a time, there was {desc} named {name}.",
    "Once upon a time, in a small town, there lived {desc} named {name}.",
    "One day, {desc} named {name} woke up early.",
    "There was once {desc} called {name}.",
    "Long ago, {desc} named {name} lived near {home}.",
    "{name} was {desc} who lived near {home}.",
]
_HOMES = ["a big hill", "a quiet lake", "the old forest", "a sunny farm", "the sea", "a tall tree",
          "a little river", "a green valley", "the busy town", "a yellow house"]
_PLACES = ["the park", "the garden", "the forest", "the beach", "the meadow", "the school",
           "the playground", "the pond", "the hill", "the library", "the zoo", "the river",
           "the field", "the woods", "the yard", "the market"]
_TIMES = ["One sunny morning", "One day", "In the afternoon", "One rainy day", "After lunch",
          "One windy evening", "On a warm summer day", "One cold winter morning", "Later that day",
          "The next morning"]
_ACTIVITIES = ["play with {pos} ball", "run in the grass", "look at the clouds", "climb trees",
               "draw pictures", "sing songs", "read books", "jump in puddles", "fly {pos} kite",
               "build castles in the sand", "dance in the rain", "chase butterflies",
               "pick flowers", "swim in the water", "ride {pos} bike", "count the stars",
               "play hide and seek", "watch the birds"]
_OBJECTS = ["ball", "kite", "hat", "toy car", "red shoe", "teddy bear", "blue box", "book",
            "shiny stone", "little boat", "drum", "scarf", "key", "doll", "map", "crayon",
            "balloon", "bell", "blanket", "rope"]
_HIDING = ["under the bed", "behind a big rock", "in the tall grass", "near the old tree",
           "under a pile of leaves", "inside a hollow log", "by the fence", "under the bench",
           "next to the pond", "on top of the shelf"]
_FEEL_BAD = ["sad", "worried", "upset", "scared", "lonely", "grumpy", "tired"]
_FEEL_GOOD = ["happy", "glad", "proud", "excited", "calm", "thankful", "joyful"]
# spoken lines carry no final punctuation: the sentence around them adds it
_SAYINGS = ["Do not worry, I will help you", "Let us look together", "I know where to look",
            "We can do it if we try", "Come with me, my friend", "Do not be sad",
            "I am here for you", "Let us go and see"]
_THANKS = ["Thank you, {f}", "Thank you so much, {f}", "You are the best, {f}",
           "Thank you for helping me, {f}"]
_GAMES = ["tag", "catch", "hide and seek", "a game with a ball", "a game of pretend",
          "jump rope", "a racing game"]
_UNTIL = ["the sun went down", "it was time to go home", "the stars came out",
          "they were very tired", "it got dark", "their moms called them"]
_MORALS = ["friends help each other", "it is good to share", "being kind makes everyone happy",
           "it is okay to ask for help", "trying again is important", "being brave is good",
           "listening to others is wise", "a good friend is a great gift"]
_ENDINGS = ["From that day on, {name} and {f} were best friends.",
            "{Pro} smiled and went home with a big smile.",
            "That night, {name} slept well and dreamed of {place}.",
            "{name} learned that {moral}.",
            "And they all lived happily ever after.",
            "{name} and {f} laughed and played until {until}.",
            "It was the best day ever."]
_NOISES = ["a loud bang", "a strange sound", "a soft tap on the window", "a funny squeak",
           "a big thump", "a rustle in the bushes"]
_HARMLESS = ["only the wind", "a little mouse", "a branch on the roof", "a friendly cat",
             "a sleepy owl", "rain on the window"]
_STUCK = ["up a tall tree", "in a muddy hole", "behind a heavy gate", "on a high rock",
          "in a thick bush", "on the other side of the river"]
_GIFTS = ["a pretty picture", "a necklace of flowers", "a shiny stone", "a paper boat",
          "a song", "a little card", "a colorful feather"]
_WEATHER_BAD = ["the sky turned dark and it began to rain", "a strong wind began to blow",
                "it started to snow", "big gray clouds rolled in", "thunder rumbled in the sky"]
_SHELTERS = ["under a big tree", "inside a small cave", "under the slide", "in an old barn",
             "under a wide umbrella", "inside a cozy tent"]


def _character(rng: SplitMix64, avoid: Optional[str] = None) -> dict:
    pool = _PEOPLE if rng.chance(0.6) else _ANIMALS
    while True:
        name, desc, pro = rng.choice(pool)
        if name != avoid:
            break
    subj, obj, pos = _PRONOUNS[pro]
    return {"name": name, "desc": desc, "pro": subj, "obj": obj, "pos": pos}


def _story(rng: SplitMix64) -> str:
    """One story: an opening, what the hero likes, one of six plots, an ending."""
    h = _character(rng)
    f = _character(rng, avoid=h["name"])
    name, pro, obj, pos, Pro = h["name"], h["pro"], h["obj"], h["pos"], _cap(h["pro"])
    fname = f["name"]
    place = rng.choice(_PLACES)
    s = [rng.choice(_OPENINGS).format(desc=h["desc"], name=name, home=rng.choice(_HOMES))]
    s.append(f"{name} loved to {rng.choice(_ACTIVITIES).format(pos=pos)}.")
    if rng.chance(0.5):
        s.append(f"{Pro} also liked to {rng.choice(_ACTIVITIES).format(pos=pos)} with {pos} "
                 f"friend {fname}, {f['desc']}.")
    when = rng.choice(_TIMES)
    plot = rng.below(6)
    if plot == 0:    # lost and found
        thing, where = rng.choice(_OBJECTS), rng.choice(_HIDING)
        s += [f"{when}, {name} went to {place} but lost {pos} {thing}.",
              f"{Pro} looked everywhere, but {pro} could not find it.",
              f"{name} felt {rng.choice(_FEEL_BAD)}.",
              f"Then {fname} came by and said, \"{rng.choice(_SAYINGS)}.\"",
              f"They looked {rng.choice(_HIDING)} and {where}.",
              f"At last, they found the {thing} {where}!",
              f"\"{rng.choice(_THANKS).format(f=fname)}!\" said {name}."]
    elif plot == 1:  # a new friend
        s += [f"{when}, {name} went to {place}.",
              f"There {pro} saw {f['desc']} sitting all alone.",
              f"\"Hello, my name is {name}. What is your name?\" asked {name}.",
              f"\"I am {fname},\" said the {f['desc'].split(' ', 1)[1]}.",
              f"\"Do you want to play {rng.choice(_GAMES)} with me?\"",
              f"{fname} felt {rng.choice(_FEEL_GOOD)} and said yes.",
              f"They played together until {rng.choice(_UNTIL)}."]
    elif plot == 2:  # bad weather
        s += [f"{when}, {name} and {fname} were playing at {place}.",
              f"Suddenly, {rng.choice(_WEATHER_BAD)}.",
              f"{fname} felt {rng.choice(_FEEL_BAD)}.",
              f"\"{rng.choice(_SAYINGS)},\" said {name}.",
              f"They ran and hid {rng.choice(_SHELTERS)}.",
              f"Soon the sky was clear again, and they went back to {place}."]
    elif plot == 3:  # helping someone stuck
        s += [f"{when}, {name} heard someone crying at {place}.",
              f"It was {fname}! {_cap(f['pro'])} was stuck {rng.choice(_STUCK)}.",
              f"{name} wanted to help, but it was hard.",
              f"{Pro} found a long {rng.choice(['stick', 'rope', 'branch', 'ladder'])} and "
              f"tried again.",
              f"This time it worked, and {fname} was free.",
              f"\"{rng.choice(_THANKS).format(f=name)}!\" said {fname}.",
              f"{name} felt {rng.choice(_FEEL_GOOD)}."]
    elif plot == 4:  # a gift
        gift = rng.choice(_GIFTS)
        s += [f"{when}, {name} wanted to make {fname} {rng.choice(_FEEL_GOOD)}.",
              f"{Pro} thought and thought, and then {pro} made {gift}.",
              f"{name} walked to {place} to find {fname}.",
              f"When {fname} saw {gift}, {f['pro']} jumped up and down.",
              f"\"{rng.choice(_THANKS).format(f=name)}!\" said {fname}.",
              f"{name} learned that giving is as fun as getting."]
    else:            # a scary noise
        s += [f"{when}, {name} heard {rng.choice(_NOISES)}.",
              f"{Pro} felt {rng.choice(_FEEL_BAD)} and hid under {pos} blanket.",
              f"Then {pro} called {fname}, and they went to look together.",
              f"It was {rng.choice(_HARMLESS)}!",
              f"{name} and {fname} laughed.",
              f"{name} was not {rng.choice(['scared', 'afraid', 'worried'])} anymore."]
    s.append(rng.choice(_ENDINGS).format(name=name, f=fname, Pro=Pro, place=place,
                                         moral=rng.choice(_MORALS), until=rng.choice(_UNTIL)))
    return " ".join(s)


def generate_stories(n_chars: int = 300_000, seed: int = 0) -> str:
    """The base corpus: simple English stories joined by ``<|endoftext|>``.

    n_chars: exact length of the returned text (about 450 characters per story).
    seed: same seed, same text; different seeds, different text.
    """
    return _join_documents(_rng_for("stories", seed), _story, n_chars)


# =========================================================================== recipes

_DISH_FORMS = {
    "soup": ["Heat {oil} in a large pot over medium heat.", "Add the {aromatic} and cook for {t} minutes until soft.",
             "Stir in the {spice} and cook for 1 minute.", "Add the {main} and {liquid}, then bring to a boil.",
             "Lower the heat and simmer for {t2} minutes.", "Blend until smooth and season with salt and pepper."],
    "stew": ["Heat {oil} in a heavy casserole dish.", "Brown the {main} in batches, about {t} minutes each.",
             "Add the {aromatic} and {spice}, and stir for 2 minutes.", "Pour in the {liquid} and scrape the bottom of the dish.",
             "Cover and simmer gently for {t2} minutes, stirring now and then.", "Season to taste and rest for 5 minutes."],
    "salad": ["Wash and dry the {veg}.", "Whisk {oil} with the {acid}, a pinch of salt and the {spice}.",
              "Slice the {main} thinly.", "Toss everything with the dressing in a large bowl.",
              "Top with {garnish} and serve at once."],
    "curry": ["Heat {oil} in a wok or deep pan.", "Fry the {aromatic} for {t} minutes until golden.",
              "Add the {spice} and a splash of water, and cook for 2 minutes.", "Add the {main} and stir to coat in the paste.",
              "Pour in the {liquid} and simmer for {t2} minutes.", "Finish with {acid} and serve with rice."],
    "pasta": ["Bring a large pan of salted water to the boil.", "Cook the pasta for {t2} minutes, then drain, keeping a cup of the water.",
              "Meanwhile, heat {oil} in a frying pan.", "Fry the {aromatic} and the {main} for {t} minutes.",
              "Add the pasta and a little cooking water, and toss over the heat.", "Season, then sprinkle with {garnish}."],
    "bake": ["Preheat the oven to {temp} C.", "Grease a baking dish with {oil}.",
             "Mix the {main} with the {aromatic} and {spice}.", "Spread the mixture in the dish and pour over the {liquid}.",
             "Bake for {t2} minutes until bubbling and golden.", "Rest for 10 minutes before slicing."],
    "stir-fry": ["Cut the {main} into bite-size strips.", "Heat {oil} in a wok until smoking.",
                 "Stir-fry the {main} for {t} minutes, then set aside.", "Add the {aromatic} and {veg}, and toss for 2 minutes.",
                 "Return the {main}, add {liquid} and {acid}, and cook for 1 minute.", "Serve hot, scattered with {garnish}."],
}
# (ingredient, short name for titles, unit, (least, most))
_MAINS = [("chicken thighs", "Chicken", "g", (300, 800)), ("red lentils", "Lentil", "g", (150, 300)),
          ("chickpeas", "Chickpea", "g", (200, 400)), ("mushrooms", "Mushroom", "g", (200, 500)),
          ("salmon fillets", "Salmon", "g", (250, 600)), ("firm tofu", "Tofu", "g", (200, 400)),
          ("pumpkin", "Pumpkin", "g", (400, 900)), ("sweet potatoes", "Sweet Potato", "g", (300, 700)),
          ("beef mince", "Beef", "g", (300, 600)), ("prawns", "Prawn", "g", (200, 400)),
          ("cauliflower", "Cauliflower", "g", (400, 800)), ("aubergine", "Aubergine", "g", (300, 600)),
          ("pork shoulder", "Pork", "g", (500, 1000)), ("white beans", "Bean", "g", (200, 400)),
          ("courgettes", "Courgette", "g", (300, 600))]
# (name in the method, one, several, fewest, most)
_AROMATICS = [("onion", "onion, chopped", "onions, chopped", 1, 2),
              ("shallots", "shallot, sliced", "shallots, sliced", 2, 4),
              ("garlic", "clove garlic, minced", "cloves garlic, minced", 2, 4),
              ("leek", "leek, sliced", "leeks, sliced", 1, 2),
              ("spring onions", "spring onion, chopped", "spring onions, chopped", 3, 6),
              ("ginger", "thumb of ginger, grated", "thumbs of ginger, grated", 1, 1),
              ("chilli", "red chilli, diced", "red chillies, diced", 1, 2),
              ("celery", "celery stick, diced", "celery sticks, diced", 2, 3)]
_SPICES = ["ground cumin", "smoked paprika", "curry powder", "dried oregano", "ground coriander",
           "turmeric", "chilli flakes", "garam masala", "dried thyme", "ground cinnamon"]
_LIQUIDS = [("vegetable stock", "ml"), ("chicken stock", "ml"), ("coconut milk", "ml"), ("chopped tomatoes", "g"),
            ("double cream", "ml"), ("soy sauce", "tbsp"), ("white wine", "ml"), ("passata", "ml")]
_OILS = ["olive oil", "butter", "sunflower oil", "sesame oil", "rapeseed oil"]
_ACIDS = ["lemon juice", "lime juice", "red wine vinegar", "cider vinegar", "balsamic vinegar"]
_VEGS = ["spinach", "rocket", "peppers", "green beans", "broccoli", "cherry tomatoes", "kale", "peas"]
_GARNISHES = ["chopped parsley", "fresh coriander", "grated parmesan", "toasted sesame seeds",
              "toasted pine nuts", "crumbled feta", "fresh basil", "sliced spring onion"]
_ADJECTIVES = ["Spicy", "Creamy", "Smoky", "Lemony", "Garlicky", "Herby", "Golden", "Rustic",
               "Quick", "Hearty", "Zesty", "Sticky", "Roasted", "Fragrant"]
_TIPS = ["Tip: This keeps in the fridge for up to 3 days.", "Tip: Freeze leftovers in portions.",
         "Tip: Swap the {main} for {other} if you like.", "Tip: Add more {spice} for extra warmth.",
         "Tip: Serve with crusty bread or steamed rice.", "Tip: Toast the spices first for a deeper flavour."]


def _quantity(rng: SplitMix64, unit: str, lo: int, hi: int) -> str:
    step = {"g": 50, "ml": 50, "tbsp": 1, "tsp": 1}[unit]
    return f"{step * rng.between(max(1, lo // step), hi // step)} {unit}"


def _recipe(rng: SplitMix64) -> str:
    """One recipe: title, servings and times, ingredient list, numbered method, a tip."""
    form = rng.choice(sorted(_DISH_FORMS))
    main, short, unit, (lo, hi) = rng.choice(_MAINS)
    aromatic, one, several, fewest, most = rng.choice(_AROMATICS)
    liquid, liquid_unit = rng.choice(_LIQUIDS)
    fill = {
        "main": main, "liquid": liquid, "oil": rng.choice(_OILS), "acid": rng.choice(_ACIDS),
        "aromatic": aromatic, "spice": rng.choice(_SPICES),
        "veg": rng.choice(_VEGS), "garnish": rng.choice(_GARNISHES),
        "t": rng.between(3, 10), "t2": 5 * rng.between(2, 12), "temp": 10 * rng.between(16, 22),
    }
    n_aromatic = rng.between(fewest, most)
    title = f"{rng.choice(_ADJECTIVES)} {short} {_cap(form)}"
    lines = [f"Recipe: {title}",
             f"Serves {rng.between(2, 6)}. Prep: {5 * rng.between(1, 6)} min. Cook: {fill['t2'] + fill['t']} min.",
             "Ingredients:",
             f"- {_quantity(rng, unit, lo, hi)} {main}",
             f"- {rng.between(1, 3)} tbsp {fill['oil']}",
             f"- {n_aromatic} {one if n_aromatic == 1 else several}",
             f"- {rng.between(1, 2)} tsp {fill['spice']}"]
    used = " ".join(_DISH_FORMS[form])
    if "{liquid}" in used:
        lq = _quantity(rng, liquid_unit, 2, 4) if liquid_unit == "tbsp" else _quantity(rng, liquid_unit, 200, 800)
        lines.append(f"- {lq} {liquid}")
    if "{acid}" in used:
        lines.append(f"- {rng.between(1, 3)} tbsp {fill['acid']}")
    if "{veg}" in used:
        lines.append(f"- {_quantity(rng, 'g', 100, 300)} {fill['veg']}")
    if "{garnish}" in used:
        lines.append(f"- a handful of {fill['garnish']}")
    lines.append("- salt and black pepper")
    lines.append("Method:")
    for k, step in enumerate(_DISH_FORMS[form], start=1):
        lines.append(f"{k}. {step.format(**fill)}")
    other = rng.choice([m[0] for m in _MAINS if m[0] != main])
    lines.append(rng.choice(_TIPS).format(main=main, other=other, spice=fill["spice"]))
    return "\n".join(lines)


def generate_recipes(n_chars: int = 100_000, seed: int = 0) -> str:
    """A fine-tuning corpus of cooking recipes joined by ``<|endoftext|>``.

    Its layout ("Recipe:", "Ingredients:", "- 250 g ...", "1. ...") and vocabulary
    (units, spices, cooking verbs, digits) are absent from the stories, so a base model
    finds it surprising and fine-tuning has something visible to learn.
    n_chars: exact length (about 600 characters per recipe). seed: as for stories.
    """
    return _join_documents(_rng_for("recipes", seed), _recipe, n_chars)


# =========================================================================== tasks


def addition_examples(n: int = 2000, max_operand: int = 99, seed: int = 0) -> List[Example]:
    """``n`` distinct problems ``{"prompt": "a+b=", "response": str(a + b)}``, with
    ``0 <= a, b <= max_operand``, in a seeded random order."""
    space = (max_operand + 1) ** 2
    if not 1 <= n <= space:
        raise ValueError(f"addition_examples: n={n} must lie in [1, {space}] "
                         f"(the number of distinct pairs with operands up to {max_operand})")
    rng = _rng_for("addition", seed)
    seen, out = set(), []
    while len(out) < n:
        a, b = rng.between(0, max_operand), rng.between(0, max_operand)
        if (a, b) not in seen:
            seen.add((a, b))
            out.append({"prompt": f"{a}+{b}=", "response": str(a + b)})
    return out


def reverse_examples(n: int = 2000, min_len: int = 3, max_len: int = 6, seed: int = 0) -> List[Example]:
    """``n`` distinct problems ``{"prompt": "reverse pakor =", "response": " rokap"}`` on
    random lower-case letter strings (not words, so the model must learn the rule)."""
    if not 1 <= min_len <= max_len:
        raise ValueError(f"reverse_examples: need 1 <= min_len <= max_len, got {min_len}, {max_len}")
    space = sum(26 ** k for k in range(min_len, max_len + 1))
    if not 1 <= n <= space:
        raise ValueError(f"reverse_examples: n={n} must lie in [1, {space}]")
    rng = _rng_for("reverse", seed)
    letters = "abcdefghijklmnopqrstuvwxyz"
    seen, out = set(), []
    while len(out) < n:
        word = "".join(rng.choice(letters) for _ in range(rng.between(min_len, max_len)))
        if word not in seen:
            seen.add(word)
            out.append({"prompt": f"reverse {word} =", "response": f" {word[::-1]}"})
    return out


def extract_answer(generated: str) -> str:
    """The answer part of a model's output: text before the first newline or
    ``<|endoftext|>``, without surrounding whitespace."""
    return generated.split(EOT, 1)[0].split("\n", 1)[0].strip()


def score_exact_match(examples: Sequence[Example], generate: Callable[[str], str],
                      limit: Optional[int] = None) -> float:
    """Fraction of examples whose generated answer equals the reference exactly.

    generate: ``generate(prompt) -> str``, the model's continuation of the prompt (the
        prompt itself not included). Both it and the reference pass through
        :func:`extract_answer` (cut at newline/end-of-text, strip spaces) before the
        comparison, so ``"47"``, ``" 47"`` and ``"47\\n12+3="`` all match ``"47"``.
    limit: score only the first ``limit`` examples.
    """
    examples = list(examples)[:limit] if limit is not None else list(examples)
    if not examples:
        raise ValueError("score_exact_match: no examples to score")
    hits = 0
    for ex in examples:
        out = generate(ex["prompt"])
        if not isinstance(out, str):
            raise TypeError(f"score_exact_match: generate() must return str, got {type(out).__name__}")
        hits += extract_answer(out) == extract_answer(ex["response"])
    return hits / len(examples)


# =========================================================================== registry


@dataclass(frozen=True)
class BuiltinDataset:
    name: str
    kind: str              # "text" (one corpus string) or "examples" (prompt/response list)
    description: str
    default_size: int      # characters for text, examples for examples
    make: Callable         # make(size, seed)


BUILTIN_DATASETS: Dict[str, BuiltinDataset] = {d.name: d for d in [
    BuiltinDataset("stories", "text", "base corpus: simple everyday stories", 300_000,
                   lambda size, seed: generate_stories(size, seed)),
    BuiltinDataset("recipes", "text", "fine-tuning text: cooking recipes", 100_000,
                   lambda size, seed: generate_recipes(size, seed)),
    BuiltinDataset("addition", "examples", "task: 'a+b=' -> sum, operands 0..99", 2000,
                   lambda size, seed: addition_examples(size, seed=seed)),
    BuiltinDataset("reverse", "examples", "task: 'reverse abc =' -> ' cba'", 2000,
                   lambda size, seed: reverse_examples(size, seed=seed)),
]}


def load_builtin(name: str, size: Optional[int] = None, seed: int = 0) -> Union[str, List[Example]]:
    """A built-in dataset by name: a ``str`` for text datasets, a list of
    ``{"prompt", "response"}`` dicts for example datasets (``BUILTIN_DATASETS[name].kind``
    says which). size: characters (text) or number of examples; default per dataset."""
    if name not in BUILTIN_DATASETS:
        raise ValueError(f"unknown built-in dataset {name!r}; choose one of {sorted(BUILTIN_DATASETS)}")
    d = BUILTIN_DATASETS[name]
    return d.make(d.default_size if size is None else int(size), seed)


# =========================================================================== user files


def read_text_file(path) -> str:
    """The whole UTF-8 text of ``path`` (a leading byte-order mark is dropped)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"text file not found: {path}")
    try:
        with open(path, "r", encoding="utf-8-sig", newline="") as f:
            text = f.read()
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e})") from None
    if not text:
        raise ValueError(f"{path}: the file is empty")
    return text


def read_jsonl(path) -> List[Example]:
    """Prompt/response examples from a JSON Lines file, one object per line:

        {"prompt": "12+35=", "response": "47"}

    Blank lines are skipped; other keys are ignored. A bad line raises ``ValueError``
    naming the file, the 1-based line number and the problem.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"JSONL file not found: {path}")
    out: List[Example] = []
    with open(path, "r", encoding="utf-8-sig") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}, line {lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(obj, dict):
                raise ValueError(f"{where}: expected a JSON object with 'prompt' and 'response', "
                                 f"got {type(obj).__name__}")
            for key in ("prompt", "response"):
                if key not in obj:
                    raise ValueError(f"{where}: missing key {key!r}")
                if not isinstance(obj[key], str):
                    raise ValueError(f"{where}: {key!r} must be a string, got "
                                     f"{type(obj[key]).__name__}")
            out.append({"prompt": obj["prompt"], "response": obj["response"]})
    if not out:
        raise ValueError(f"{path}: no examples (the file has no non-blank lines)")
    return out


# =========================================================================== splits


def split_text(text, val_fraction: float = 0.1):
    """Split by position: the last ``val_fraction`` is validation.

    Works on a ``str`` or on a 1-D token array alike. Returns ``(train, val)`` with
    ``len(val) == int(len(text) * val_fraction)``.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must lie in [0, 1), got {val_fraction}")
    n_val = int(len(text) * val_fraction)
    cut = len(text) - n_val
    return text[:cut], text[cut:]


def split_examples(examples: Sequence[Example], val_fraction: float = 0.1,
                   seed: int = 0) -> Tuple[List[Example], List[Example]]:
    """Shuffle (seeded, deterministic) then split off ``round(n * val_fraction)``
    examples for validation (at least one when ``val_fraction > 0`` and n >= 2).
    Returns ``(train, val)``; each keeps the shuffled order."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must lie in [0, 1), got {val_fraction}")
    items = list(examples)
    n_val = int(round(len(items) * val_fraction))
    if val_fraction > 0 and n_val == 0 and len(items) >= 2:
        n_val = 1
    n_val = min(n_val, len(items) - 1) if items else 0
    _rng_for("split", seed).shuffle(items)
    return items[:len(items) - n_val], items[len(items) - n_val:]


# =========================================================================== token streams


def encode_corpus(tokenizer, text) -> np.ndarray:
    """Encode a corpus into one int64 token stream, shape (N,).

    text: a ``str`` (document boundaries already written as ``<|endoftext|>``, as in
        the built-in corpora), or a sequence of documents, which are encoded one by one
        with ``eot_id`` placed between them. Both give the same ids for the same text:
        a ``str`` is cut at its ``<|endoftext|>`` markers and encoded as documents,
        which lets a tokenizer with ``encode_batch`` work on them in parallel.
    """
    docs = text.split(EOT) if isinstance(text, str) else list(text)
    if hasattr(tokenizer, "encode_batch"):
        encoded = tokenizer.encode_batch(docs)
    else:
        encoded = [tokenizer.encode(doc) for doc in docs]
    ids: List[int] = []
    for k, doc_ids in enumerate(encoded):
        if k:
            ids.append(tokenizer.eot_id)
        ids.extend(doc_ids)
    return np.asarray(ids, dtype=np.int64)


def get_batch(tokens: np.ndarray, batch_size: int, block_size: int,
              rng: np.random.Generator) -> Tuple[np.ndarray, np.ndarray]:
    """``batch_size`` random windows of the stream: inputs and next-token targets.

    x[b, t] = tokens[s_b + t],  y[b, t] = tokens[s_b + t + 1]   (so y is x shifted by 1)
    with starts s_b drawn uniformly from [0, N - T - 1].
    Returns x, y: int64 (B, T).
    """
    tokens = np.asarray(tokens)
    if tokens.ndim != 1:
        raise ValueError(f"get_batch: tokens must be 1-D, got shape {tokens.shape}")
    N = tokens.shape[0]
    if N < block_size + 1:
        raise ValueError(f"get_batch: the token stream has {N} tokens, but a window of "
                         f"block_size={block_size} needs at least {block_size + 1}")
    if batch_size < 1 or block_size < 1:
        raise ValueError(f"get_batch: batch_size and block_size must be positive, "
                         f"got {batch_size}, {block_size}")
    starts = rng.integers(0, N - block_size, size=batch_size)            # (B,)
    idx = starts[:, None] + np.arange(block_size + 1)[None, :]           # (B, T+1)
    window = tokens[idx].astype(np.int64)                                # (B, T+1)
    return window[:, :-1], window[:, 1:]


def iter_text_batches(tokens: np.ndarray, batch_size: int,
                      block_size: int) -> Iterator[Tuple[np.ndarray, np.ndarray]]:
    """Every non-overlapping window of the stream, in order, ``batch_size`` at a time
    (the last batch may be smaller; a tail shorter than a window is dropped). For a
    deterministic validation loss. Yields x, y: int64 (b, T)."""
    tokens = np.asarray(tokens)
    n_windows = (tokens.shape[0] - 1) // block_size
    if n_windows < 1:
        raise ValueError(f"iter_text_batches: the token stream has {tokens.shape[0]} tokens, "
                         f"but a window of block_size={block_size} needs at least {block_size + 1}")
    starts = np.arange(n_windows) * block_size
    for i in range(0, n_windows, batch_size):
        idx = starts[i:i + batch_size, None] + np.arange(block_size + 1)[None, :]  # (b, T+1)
        window = tokens[idx].astype(np.int64)
        yield window[:, :-1], window[:, 1:]


# =========================================================================== examples


class EncodedExample(NamedTuple):
    input_ids: np.ndarray   # (L,) int64: the sequence without its last token
    targets: np.ndarray     # (L,) int64: the next token at each position; -100 on the prompt


def encode_examples(tokenizer, examples: Sequence[Example], block_size: int,
                    truncate: bool = False) -> List[EncodedExample]:
    """Turn prompt/response examples into (input_ids, targets) pairs for fine-tuning.

    The sequence is ``prompt + response + [eot]`` (ids s_0 .. s_{L}); the model reads
    ``input_ids = s[:-1]`` and is asked for ``targets = s[1:]``. A target that is still
    part of the prompt (position t < P - 1, with P prompt tokens) is set to -100 so the
    loss counts only the response and the final eot (which teaches the model to stop).
    Prompt and response are encoded separately, so the boundary is exact and matches
    ``encode(prompt)`` at generation time.

    Too long (``L > block_size``): by default a ``ValueError`` naming the example. With
    ``truncate=True`` the sequence is cut to ``block_size`` positions from the end of
    the response (the prompt is kept whole); an example whose prompt alone fills the
    block still raises, since it would leave nothing to learn.
    """
    eot = tokenizer.eot_id
    out: List[EncodedExample] = []
    for k, ex in enumerate(examples):
        p = tokenizer.encode(ex["prompt"])
        r = tokenizer.encode(ex["response"])
        seq = p + r + [eot]
        L = len(seq) - 1
        if L > block_size:
            if not truncate or len(p) >= block_size:
                raise ValueError(
                    f"encode_examples: example {k} is {L} tokens (prompt {len(p)}, response "
                    f"{len(r)} + end-of-text) but block_size is {block_size}"
                    + ("" if not truncate else "; its prompt alone fills the block")
                    + (". Pass truncate=True to cut the response" if not truncate else ""))
            seq = seq[:block_size + 1]
        s = np.asarray(seq, dtype=np.int64)
        x, y = s[:-1].copy(), s[1:].copy()
        y[:max(len(p) - 1, 0)] = IGNORE_INDEX
        out.append(EncodedExample(x, y))
    return out


def pad_batch(encoded: Sequence[EncodedExample], pad_id: int) -> Tuple[np.ndarray, np.ndarray]:
    """Stack examples of different lengths, padding on the right to the longest one.

    Padding inputs get ``pad_id`` (use the tokenizer's ``eot_id``) and padding targets
    get -100. With causal attention a position never looks to its right, so right
    padding leaves the real positions' outputs unchanged. Returns x, y: int64 (B, T).
    """
    if not encoded:
        raise ValueError("pad_batch: no examples")
    T = max(len(e.input_ids) for e in encoded)
    x = np.full((len(encoded), T), pad_id, dtype=np.int64)          # (B, T)
    y = np.full((len(encoded), T), IGNORE_INDEX, dtype=np.int64)    # (B, T)
    for b, e in enumerate(encoded):
        x[b, :len(e.input_ids)] = e.input_ids
        y[b, :len(e.targets)] = e.targets
    return x, y


def example_batch(encoded: Sequence[EncodedExample], batch_size: int, rng: np.random.Generator,
                  pad_id: int) -> Tuple[np.ndarray, np.ndarray]:
    """A random batch of encoded examples (without replacement when there are enough),
    padded with :func:`pad_batch`. Returns x, y: int64 (B, T_longest)."""
    if not encoded:
        raise ValueError("example_batch: no examples")
    idx = rng.choice(len(encoded), size=batch_size, replace=batch_size > len(encoded))
    return pad_batch([encoded[i] for i in idx], pad_id)


def iter_example_batches(encoded: Sequence[EncodedExample], batch_size: int,
                         pad_id: int) -> Iterator[Tuple[np.ndarray, np.ndarray]]:
    """Every example once, in order, ``batch_size`` at a time (the last batch may be
    smaller), padded with :func:`pad_batch`. For a deterministic evaluation."""
    for i in range(0, len(encoded), batch_size):
        yield pad_batch(encoded[i:i + batch_size], pad_id)
