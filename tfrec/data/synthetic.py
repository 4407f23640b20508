"""A seeded synthetic e-commerce world whose ground truth is known.

Real logs cannot tell how good a recommender is in absolute terms; a simulated
world can: users have latent, drifting preferences, and `World.oracle_topk` gives
the items they truly like best, so metrics have a ceiling to compare against.

Generation is two-stage (pick a leaf category, then score only its items) and
vectorised over sessions, so 100k items and a million events take minutes. Worlds
too large for memory (`xlarge`) are streamed to disk by `synthetic_stream`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from typing import Dict, List, NamedTuple, Optional, Sequence, Set, Tuple, Union

import numpy as np
import pandas as pd

from tfrec.data import lexicon_zh as zh
from tfrec.data.io import atomic_write, read_table, write_table
from tfrec.data.schema import DEVICES, EVENT_TYPES, validate_table

# --------------------------------------------------------------------------------
# Vocabularies. Each leaf: (typical price, noun groups); a noun group lists words a
# shopper may use for the same product, the first being the usual one.
# --------------------------------------------------------------------------------

DEPARTMENTS: Dict[str, Dict[str, tuple]] = {
    "electronics": {
        "headphones": (90, ["headphones|earphones|headset", "earbuds|in-ear headphones"]),
        "speakers": (70, ["speaker|loudspeaker|sound box", "soundbar|sound bar"]),
        "smartwatches": (180, ["smartwatch|smart watch", "fitness tracker|activity tracker"]),
        "laptops": (900, ["laptop|notebook computer", "ultrabook|thin laptop"]),
        "cameras": (450, ["camera|digital camera", "action camera|action cam"]),
        "chargers": (25, ["charger|power adapter|charging plug", "power bank|battery pack"]),
    },
    "home": {
        "sofas": (800, ["sofa|couch|settee", "sectional sofa|corner couch", "loveseat|two-seater"]),
        "lamps": (60, ["floor lamp|standing lamp", "table lamp|desk lamp|bedside lamp"]),
        "rugs": (150, ["rug|carpet|area rug", "runner|hallway rug"]),
        "beds": (600, ["bed frame|bedstead", "mattress|bed mattress"]),
        "curtains": (45, ["curtains|drapes", "blinds|window shades"]),
    },
    "kitchen": {
        "blenders": (70, ["blender|smoothie maker|mixer", "hand blender|immersion blender"]),
        "coffee makers": (120, ["coffee maker|coffee machine", "espresso machine|espresso maker"]),
        "cookware": (50, ["frying pan|skillet|fry pan", "saucepan|cooking pot",
                          "dutch oven|casserole"]),
        "knives": (60, ["chef knife|kitchen knife|cooks knife", "knife set|knife block"]),
        "kettles": (40, ["kettle|electric kettle|water boiler", "tea kettle|stovetop kettle"]),
    },
    "fashion": {
        "sneakers": (85, ["sneakers|trainers|running shoes", "high-top sneakers|hi-tops"]),
        "jackets": (120, ["jacket|coat", "rain jacket|raincoat", "puffer jacket|down jacket"]),
        "jeans": (60, ["jeans|denim pants|denims", "slim jeans|skinny jeans"]),
        "dresses": (70, ["dress|gown", "maxi dress|long dress", "summer dress|sundress"]),
        "backpacks": (55, ["backpack|rucksack|daypack", "laptop backpack|laptop bag"]),
    },
    "tools": {
        "drills": (110, ["drill|power drill|drill driver", "impact driver|impact drill"]),
        "saws": (130, ["circular saw|buzz saw", "jigsaw|scroll saw", "hand saw|handsaw"]),
        "toolboxes": (45, ["toolbox|tool chest|tool box", "tool kit|tool set"]),
        "screwdrivers": (25, ["screwdriver set|screwdrivers", "electric screwdriver|driver"]),
        "ladders": (90, ["ladder|step ladder|stepladder", "extension ladder|telescopic ladder"]),
    },
    "sports": {
        "yoga mats": (30, ["yoga mat|exercise mat|workout mat"]),
        "bicycles": (650, ["bicycle|bike|cycle", "mountain bike|mtb", "e-bike|electric bike"]),
        "dumbbells": (50, ["dumbbells|hand weights|free weights", "kettlebell|kettle bell"]),
        "tents": (160, ["tent|camping tent", "backpacking tent|hiking tent"]),
        "running shorts": (30, ["running shorts|gym shorts|jogging shorts", "leggings|tights"]),
    },
    "beauty": {
        "shampoo": (12, ["shampoo|hair wash", "conditioner|hair conditioner"]),
        "moisturizers": (25, ["moisturizer|face cream|moisturiser", "body lotion|body cream"]),
        "perfume": (70, ["perfume|fragrance|eau de parfum", "cologne|eau de toilette"]),
        "hair dryers": (60, ["hair dryer|blow dryer|hairdryer", "hair straightener|flat iron"]),
        "lipstick": (18, ["lipstick|lip color", "lip gloss|lip shine"]),
    },
    "toys": {
        "building blocks": (40, ["building blocks|building bricks|construction set"]),
        "dolls": (30, ["doll|fashion doll", "plush toy|stuffed animal|teddy"]),
        "puzzles": (20, ["jigsaw puzzle|puzzle", "puzzle cube|3d puzzle"]),
        "board games": (35, ["board game|tabletop game", "card game|card deck"]),
        "rc cars": (70, ["rc car|remote control car", "drone|quadcopter"]),
    },
    "garden": {
        "lawn mowers": (300, ["lawn mower|lawnmower|grass cutter", "robot mower|robotic mower"]),
        "hoses": (35, ["garden hose|water hose|hose pipe", "sprinkler|lawn sprinkler"]),
        "planters": (30, ["planter|flower pot|plant pot", "raised bed|garden bed"]),
        "grills": (350, ["grill|barbecue|bbq", "smoker|pellet grill"]),
        "garden chairs": (80, ["garden chair|patio chair|outdoor chair", "sun lounger|deck chair"]),
    },
    "office": {
        "desk chairs": (200, ["office chair|desk chair|task chair", "gaming chair|gamer chair"]),
        "desks": (300, ["desk|writing desk|work desk", "standing desk|sit-stand desk"]),
        "notebooks": (12, ["notebook|notepad|journal", "planner|agenda|diary"]),
        "pens": (8, ["pen|ballpoint pen|ballpoint", "fountain pen|ink pen", "marker|felt-tip pen"]),
        "printers": (180, ["printer|inkjet printer", "laser printer|laserjet"]),
    },
}

ATTRIBUTES: Dict[str, str] = {
    "electronics": "wireless bluetooth noise-cancelling portable compact smart waterproof "
                   "fast-charging ultra-slim",
    "home": "modern rustic scandinavian mid-century minimalist cozy vintage handmade",
    "kitchen": "non-stick high-speed programmable cordless compact professional "
               "dishwasher-safe",
    "fashion": "slim-fit waterproof lightweight classic oversized breathable vintage casual",
    "tools": "cordless brushless heavy-duty 18v compact professional lightweight",
    "sports": "lightweight foldable non-slip breathable adjustable ultralight durable",
    "beauty": "organic vegan hydrating fragrance-free travel-size ionic long-lasting matte",
    "toys": "educational wooden classic deluxe magnetic creative mini",
    "garden": "cordless self-propelled weatherproof foldable expandable rustproof",
    "office": "ergonomic adjustable refillable wireless compact premium",
}

MATERIALS: Dict[str, str] = {
    "home": "oak walnut linen cotton wool leather velvet",
    "kitchen": "stainless-steel ceramic glass copper bamboo cast-iron",
    "fashion": "leather denim cotton suede wool nylon",
    "sports": "rubber aluminium carbon nylon",
    "garden": "teak aluminium rattan terracotta",
    "office": "leather mesh wood aluminium",
}

COLORS = ("black white grey navy red blue green beige silver pink brown yellow olive "
          "charcoal").split()
SIZES = "XS S M L XL XXL".split()
_BRAND_HEADS = ("Zen Kor Vel Astr Nor Lum Quin Bri Tal Or Syl Mar Cal Dex Fen Hal Jun Kai "
                "Lyr Mon Nex Pax Rho Sol Tor Vy Wen Xel Yor Zar").split()
_BRAND_TAILS = "ora ex ion ix ana eon ato ia us en ar ique o ell wyn ara".split()
BRAND_TIERS = np.array([-0.5, -0.15, 0.2, 0.6])  # budget, value, premium, luxury (log)
_QUERY_MODIFIERS = ("cheap", "best", "new", "sale")

# Daily traffic by UTC hour: quiet nights, lunch and evening peaks.
HOUR_WEIGHTS = np.array([2, 1, 1, 1, 1, 1, 2, 3, 4, 5, 5, 6, 7, 6, 5, 5, 5, 6, 8, 9, 10, 9, 7, 4],
                        dtype=np.float64)

LANGUAGES = ("en", "zh")  # vocabularies of the world (English tables above, Chinese in zh)
COLD_START_FRACTION = 0.1  # cold items/users appear in this last share of the range
CATEGORY_EPS = 1e-3  # floor of category weights: users sometimes like anything
DAY = 86400

# Behaviour model constants (click/cart/purchase logits).
_CLICK_BIAS, _CLICK_SCALE, _TARGET_BONUS, _CLICK_NOISE = 0.1, 0.8, 1.8, 0.6
_CART_BIAS, _PURCHASE_BIAS = -0.6, -0.2


@dataclass(frozen=True)
class WorldSpec:
    """Size and behaviour knobs of a synthetic world.

    Attributes:
      num_items, num_users: catalog and user base sizes.
      days: length of the simulated period.
      sessions_per_user: mean sessions of a user active for the whole period.
      impressions_per_session: maximum results shown per session.
      search_fraction: share of sessions that start with a search.
      cold_item_fraction, cold_user_fraction: share created in the last 10% of time.
      zipf_exponent: skew of item popularity.
      drift: 0 = stable tastes, 1 = category tastes fully replaced by the end.
      popularity_beta: weight of log popularity in the true utility.
      synonym_rate, typo_rate: query noise.
      start_ts: first second (UTC midnight keeps the hour pattern aligned).
      lang: language of titles, descriptions, categories and queries ("en" or "zh"; the
        same leaves, prices and behaviour either way).
    """

    name: str = "custom"
    num_items: int = 5000
    num_users: int = 4000
    days: int = 60
    sessions_per_user: float = 9.0
    impressions_per_session: int = 10
    search_fraction: float = 0.4
    cold_item_fraction: float = 0.05
    cold_user_fraction: float = 0.05
    zipf_exponent: float = 1.0
    drift: float = 0.5
    popularity_beta: float = 0.3
    synonym_rate: float = 0.35
    typo_rate: float = 0.1
    start_ts: int = 1704067200  # 2024-01-01 00:00 UTC
    lang: str = "en"

    def __post_init__(self):
        if self.lang not in LANGUAGES:
            raise ValueError(f"WorldSpec.lang must be one of {list(LANGUAGES)}, got "
                             f"{self.lang!r}")
        num_leaves = sum(len(v) for v in DEPARTMENTS.values())
        if self.num_items < num_leaves:
            raise ValueError(f"num_items must be >= {num_leaves} (one per leaf category), "
                             f"got {self.num_items}")
        for name in ("num_users", "days", "impressions_per_session"):
            if getattr(self, name) < 1:
                raise ValueError(f"WorldSpec.{name} must be >= 1, got {getattr(self, name)}")
        if self.sessions_per_user <= 0:
            raise ValueError(f"WorldSpec.sessions_per_user must be > 0, got "
                             f"{self.sessions_per_user}")
        for name in ("search_fraction", "cold_item_fraction", "cold_user_fraction", "drift",
                     "synonym_rate", "typo_rate"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"WorldSpec.{name} must be in [0, 1], got "
                                 f"{getattr(self, name)}")

    @property
    def t_start(self) -> int:
        return int(self.start_ts)

    @property
    def t_end(self) -> int:
        return int(self.start_ts) + int(self.days) * DAY


WORLD_PRESETS: Dict[str, WorldSpec] = {
    "tiny": WorldSpec(name="tiny", num_items=300, num_users=300, days=30,
                      sessions_per_user=14.0),
    "small": WorldSpec(name="small", num_items=5000, num_users=4000, days=60,
                       sessions_per_user=12.0),
    "medium": WorldSpec(name="medium", num_items=100_000, num_users=30_000, days=90,
                        sessions_per_user=5.5),
    "large": WorldSpec(name="large", num_items=1_000_000, num_users=30_000, days=90,
                       sessions_per_user=4.5),
    # ~1.2M sessions of ~9.7 events: ~11.7M events, too many to hold in memory;
    # `tfrec generate` streams it (synthetic_stream.write_world_streaming).
    "xlarge": WorldSpec(name="xlarge", num_items=1_000_000, num_users=200_000, days=90,
                        sessions_per_user=7.0),
}


def get_spec(spec: Union[WorldSpec, str]) -> WorldSpec:
    """Returns a WorldSpec from itself or a preset name."""
    if isinstance(spec, WorldSpec):
        return spec
    if spec not in WORLD_PRESETS:
        raise ValueError(f"unknown world preset {spec!r}; expected one of "
                         f"{list(WORLD_PRESETS)} or a WorldSpec")
    return WORLD_PRESETS[spec]


# --------------------------------------------------------------------------------
# Vocabulary tables as arrays.
# --------------------------------------------------------------------------------

@dataclass
class _Vocab:
    lang: str
    departments: List[str]
    leaf_names: List[str]  # "department>leaf"
    leaf_dept: np.ndarray
    leaf_price: np.ndarray
    group_words: List[List[str]]  # noun groups, all leaves concatenated
    group_leaf: np.ndarray
    attributes: List[List[str]]  # per department
    materials: List[List[str]]  # per department, possibly empty
    colors: List[str]
    brand_heads: List[str]
    brand_tails: List[str]
    modifiers: tuple


def _vocab(lang: str = "en") -> _Vocab:
    tables = (DEPARTMENTS, ATTRIBUTES, MATERIALS, COLORS, _BRAND_HEADS, _BRAND_TAILS,
              _QUERY_MODIFIERS)
    if lang == "zh":
        tables = (zh.DEPARTMENTS_ZH, zh.ATTRIBUTES_ZH, zh.MATERIALS_ZH, zh.COLORS_ZH,
                  zh.BRAND_HEADS_ZH, zh.BRAND_TAILS_ZH, zh.MODIFIERS_ZH)
    depts, attributes, materials, colors, heads, tails, modifiers = tables
    departments = list(depts)
    leaf_names, leaf_dept, leaf_price, group_words, group_leaf = [], [], [], [], []
    for d, dept in enumerate(departments):
        for leaf, (price, groups) in depts[dept].items():
            for group in groups:
                group_words.append(group.split("|"))
                group_leaf.append(len(leaf_names))
            leaf_names.append(f"{dept}>{leaf}")
            leaf_dept.append(d)
            leaf_price.append(price)
    return _Vocab(
        lang=lang, departments=departments, leaf_names=leaf_names,
        leaf_dept=np.array(leaf_dept), leaf_price=np.array(leaf_price, dtype=np.float64),
        group_words=group_words, group_leaf=np.array(group_leaf),
        attributes=[attributes[d].split() for d in departments],
        materials=[materials.get(d, "").split() for d in departments],
        colors=list(colors), brand_heads=list(heads), brand_tails=list(tails),
        modifiers=tuple(modifiers))


class _GroupSampler:
    """Draws items within groups (leaf, department...) proportionally to weights.

    One sorted array of "group + cumulative share" keys answers every session's
    draw with a single searchsorted, instead of one `choice` call per session.
    """

    def __init__(self, item_group: np.ndarray, weights: np.ndarray, num_groups: int):
        if np.all(item_group[1:] >= item_group[:-1]):
            order = np.arange(len(item_group))
        else:
            order = np.argsort(item_group, kind="stable")
        groups = item_group[order]
        w = weights[order].astype(np.float64)
        starts = np.searchsorted(groups, np.arange(num_groups + 1))
        cum = np.cumsum(w)
        base = np.concatenate([[0.0], cum])[starts[:-1]]
        totals = cum[np.maximum(starts[1:] - 1, 0)] - base
        share = (cum - base[groups]) / np.maximum(totals[groups], 1e-300)
        last = starts[1:][starts[1:] > starts[:-1]] - 1
        share[last] = 1.0  # exact group ends: float error never leaks into the next group
        self.order = order
        self.keys = groups + share

    def sample(self, groups: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        u = np.clip(rng.random(len(groups)), 1e-12, 1.0 - 1e-12)
        pos = np.searchsorted(self.keys, groups + u, side="left")
        return self.order[np.minimum(pos, len(self.order) - 1)]


# --------------------------------------------------------------------------------
# Catalog.
# --------------------------------------------------------------------------------

def _cold_end(spec: WorldSpec) -> int:
    """Latest creation time of cold items/users: they still get some sessions."""
    span = spec.t_end - spec.t_start
    return spec.t_end - max(int(0.03 * span), 2 * 3600)


def _brand_names(count: int, vocab: _Vocab, rng: np.random.Generator) -> List[str]:
    names = [h + t for h in vocab.brand_heads for t in vocab.brand_tails]  # 480 distinct
    return [names[i] for i in rng.permutation(len(names))[:count]]


def _capitalise(words: str) -> str:
    return " ".join(w[:1].upper() + w[1:] for w in words.split())


_FASHION = list(DEPARTMENTS).index("fashion")  # department index, the same in every language


def _texts_en(brand: str, attrs: List[str], noun: str, other: str, model: str, leaf: str,
              department: str, sizes: Optional[tuple]) -> tuple:
    """(title, description) of an English item."""
    title = " ".join([brand, _capitalise(" ".join(attrs + [noun]))] + ([model] if model else []))
    parts = [f"This {' '.join(attrs + [other])} by {brand} belongs to our {leaf} range."]
    if sizes:
        parts.append(f"Available in sizes {sizes[0]} to {sizes[1]}.")
    parts.append(f"A great {noun} for everyday {department} needs.")
    return title, " ".join(parts)


def _texts_zh(brand: str, attrs: List[str], noun: str, other: str, model: str, leaf: str,
              department: str, sizes: Optional[tuple]) -> tuple:
    """(title, description) of a Chinese item: words run together, as Chinese titles do."""
    title = " ".join([brand, "".join(attrs + [noun])] + ([model] if model else []))
    parts = [f"这款{''.join(attrs + [other])}来自{brand}，属于我们的{leaf}系列。"]
    if sizes:
        parts.append(f"尺码{sizes[0]}到{sizes[1]}可选。")
    parts.append(f"日常{department}必备的好{noun}。")
    return title, "".join(parts)


def _make_catalog(spec: WorldSpec, vocab: _Vocab, rng: np.random.Generator):
    n, num_leaves, num_depts = spec.num_items, len(vocab.leaf_names), len(vocab.departments)
    span = spec.t_end - spec.t_start

    # Leaves differ in size; every leaf gets at least one item.
    leaf_share = rng.dirichlet(np.full(num_leaves, 4.0))
    item_leaf = np.concatenate([np.arange(num_leaves),
                                rng.choice(num_leaves, n - num_leaves, p=leaf_share)])
    item_leaf = item_leaf[rng.permutation(n)]
    item_dept = vocab.leaf_dept[item_leaf]

    # Brands: 1-2 departments each, a price tier and a popularity.
    num_brands = int(np.clip(n // 20, 12, 400))  # at least one per department
    brand_dept = np.stack([rng.permutation(num_brands) % num_depts,
                           np.where(rng.random(num_brands) < 0.3,
                                    rng.integers(num_depts, size=num_brands), -1)], axis=1)
    brand_dept[brand_dept[:, 1] == brand_dept[:, 0], 1] = -1
    brand_tier = rng.choice(len(BRAND_TIERS), num_brands, p=[0.3, 0.35, 0.25, 0.1])
    brand_weight = rng.lognormal(0.0, 0.7, num_brands)
    brand_names = _brand_names(num_brands, vocab, rng)
    item_brand = np.zeros(n, dtype=np.int64)
    for d in range(num_depts):
        members = np.flatnonzero((brand_dept == d).any(axis=1))
        items = np.flatnonzero(item_dept == d)
        p = brand_weight[members] / brand_weight[members].sum()
        item_brand[items] = rng.choice(members, len(items), p=p)

    # Product noun: a group of the leaf, usually its main word in the title.
    group_count = np.bincount(vocab.group_leaf, minlength=num_leaves)
    group_start = np.concatenate([[0], np.cumsum(group_count)[:-1]])
    item_group = group_start[item_leaf] + (rng.random(n) * group_count[item_leaf]).astype(int)
    group_size = np.array([len(w) for w in vocab.group_words])[item_group]
    item_word = np.where(rng.random(n) < 0.65, 0,
                         1 + (rng.random(n) * (group_size - 1)).astype(int))
    item_word = np.minimum(item_word, group_size - 1)

    attr_count = np.array([len(a) for a in vocab.attributes])[item_dept]
    item_attr = np.where(rng.random(n) < 0.75, (rng.random(n) * attr_count).astype(int), -1)
    mat_count = np.array([len(m) for m in vocab.materials])[item_dept]
    item_material = np.where((mat_count > 0) & (rng.random(n) < 0.5),
                             (rng.random(n) * np.maximum(mat_count, 1)).astype(int), -1)
    item_color = np.where(rng.random(n) < 0.6, rng.integers(len(vocab.colors), size=n), -1)
    has_model = rng.random(n) < 0.3
    model_style = rng.integers(3, size=n)
    letters = "ABCDEFGHJKLMNPRSTVXZ"
    model_letters = rng.integers(len(letters), size=(n, 2))
    model_number = rng.integers(1, 99, size=n)

    log_price = (np.log(vocab.leaf_price[item_leaf]) + BRAND_TIERS[brand_tier[item_brand]]
                 + rng.normal(0.0, 0.3, n))
    price = np.exp(log_price)
    price = np.where(price > 5, np.floor(price) + 0.99, np.round(price, 2))
    rel_price = np.log(price) - np.log(vocab.leaf_price[item_leaf])

    # Most items predate the log; cold items appear in the last 10% of it.
    num_cold = int(round(spec.cold_item_fraction * n))
    created = spec.t_start - rng.integers(0, 365 * DAY, size=n)
    cold = rng.permutation(n)[:num_cold]
    t_cold = spec.t_end - int(COLD_START_FRACTION * span)
    created[cold] = rng.integers(t_cold, _cold_end(spec), size=num_cold)

    ranks = rng.permutation(n) + 1.0
    log_pop = -spec.zipf_exponent * np.log(ranks)
    log_pop -= log_pop.mean()

    width = max(6, len(str(n - 1)))
    item_ids = np.array([f"I{i:0{width}d}" for i in range(n)], dtype=object)
    titles, descriptions, models = [], [], []
    for i in range(n):
        d = item_dept[i]
        words = vocab.group_words[item_group[i]]
        noun = words[item_word[i]]
        attrs = []
        if item_color[i] >= 0:
            attrs.append(vocab.colors[item_color[i]])
        if item_attr[i] >= 0:
            attrs.append(vocab.attributes[d][item_attr[i]])
        if item_material[i] >= 0:
            attrs.append(vocab.materials[d][item_material[i]])
        model = ""
        if has_model[i]:
            a, b = letters[model_letters[i, 0]], letters[model_letters[i, 1]]
            model = (f"{a}{b}-{model_number[i] * 10}", f"{a}{model_number[i]}",
                     f"{a}{b}{model_number[i]}")[model_style[i]]
        models.append(model)
        brand = brand_names[item_brand[i]]
        # Descriptions use another word of the noun group: text models can learn
        # that "couch" and "sofa" go together.
        other = words[(item_word[i] + 1) % len(words)]
        leaf = vocab.leaf_names[item_leaf[i]].split(">")[1]
        sizes = (SIZES[i % 3], SIZES[3 + i % 3]) if d == _FASHION else None
        title, description = (_texts_zh if vocab.lang == "zh" else _texts_en)(
            brand, attrs, noun, other, model, leaf, vocab.departments[d], sizes)
        titles.append(title)
        descriptions.append(description)

    catalog = pd.DataFrame({
        "item_id": item_ids, "title": titles, "description": descriptions,
        "category": np.array(vocab.leaf_names, dtype=object)[item_leaf],
        "brand": np.array(brand_names, dtype=object)[item_brand],
        "price": price.astype(np.float64), "created_ts": created.astype(np.int64),
        # Attributes beyond the schema (declare them under `features:` to use them).
        "color": np.array([vocab.colors[c] if c >= 0 else "" for c in item_color], dtype=object),
        "material": np.array([vocab.materials[d][m] if m >= 0 else ""
                              for d, m in zip(item_dept, item_material)], dtype=object),
        # Shoppers rate what sells: a 1-5 rating that follows the true popularity.
        "rating": np.round(np.clip(3.5 + (log_pop - log_pop.mean()) / (log_pop.std() + 1e-9),
                                   1.0, 5.0), 1)})
    truth = {
        "item_ids": item_ids.astype(str), "item_leaf": item_leaf.astype(np.int32),
        "item_brand": item_brand.astype(np.int32), "item_group": item_group.astype(np.int32),
        "item_word": item_word.astype(np.int32), "item_color": item_color.astype(np.int32),
        "item_attr": item_attr.astype(np.int32), "item_material": item_material.astype(np.int32),
        "item_model": np.array(models, dtype=str), "item_rel_price": rel_price.astype(np.float32),
        "item_log_pop": log_pop.astype(np.float32), "item_created_ts": created.astype(np.int64),
        "leaf_names": np.array(vocab.leaf_names), "leaf_dept": vocab.leaf_dept.astype(np.int32),
        "brand_names": np.array(brand_names), "brand_tier": BRAND_TIERS[brand_tier],
        "brand_dept": brand_dept.astype(np.int32),
    }
    return catalog, truth


# --------------------------------------------------------------------------------
# Users.
# --------------------------------------------------------------------------------

def _category_weights(fav_a: np.ndarray, fav_b: np.ndarray, leaf_dept: np.ndarray,
                      rng: np.random.Generator) -> np.ndarray:
    """Dirichlet weights over leaves, concentrated on one or two departments."""
    alpha = 0.005 + 0.35 * (leaf_dept[None, :] == fav_a[:, None])
    alpha = alpha + 0.2 * ((leaf_dept[None, :] == fav_b[:, None]) & (fav_b[:, None] >= 0))
    g = rng.gamma(alpha) + 1e-12
    return (g / g.sum(axis=1, keepdims=True)).astype(np.float32)


def _make_users(spec: WorldSpec, truth: Dict[str, np.ndarray], rng: np.random.Generator):
    u = spec.num_users
    num_depts = int(truth["leaf_dept"].max()) + 1
    span = spec.t_end - spec.t_start
    leaf_dept = truth["leaf_dept"]

    fav_a = rng.integers(num_depts, size=u)
    fav_b = np.where(rng.random(u) < 0.5, rng.integers(num_depts, size=u), -1)
    w0 = _category_weights(fav_a, fav_b, leaf_dept, rng)
    # Drift: the second department may change and leaf tastes are redrawn.
    fav_b1 = np.where(rng.random(u) < 0.5, rng.integers(num_depts, size=u), fav_b)
    w1 = _category_weights(fav_a, fav_b1, leaf_dept, rng)

    # Favourite brands come from the user's departments.
    brand_dept = truth["brand_dept"]
    brand_members = np.concatenate([np.flatnonzero(brand_dept[:, 0] >= 0), np.flatnonzero(
        brand_dept[:, 1] >= 0)])
    member_dept = np.concatenate([brand_dept[brand_dept[:, 0] >= 0, 0],
                                  brand_dept[brand_dept[:, 1] >= 0, 1]])
    sampler = _GroupSampler(member_dept, np.ones(len(member_dept)), num_depts)
    slot_dept = np.stack([fav_a, fav_a, np.where(fav_b >= 0, fav_b, fav_a)], axis=1)
    fav_brands = brand_members[sampler.sample(slot_dept.ravel(), rng)].reshape(u, 3)
    fav_brands[rng.random(u) < 0.4, 2] = -1

    num_cold = int(round(spec.cold_user_fraction * u))
    t_cold = spec.t_end - int(COLD_START_FRACTION * span)
    signup = np.where(rng.random(u) < 0.75, spec.t_start - rng.integers(0, 730 * DAY, size=u),
                      rng.integers(spec.t_start, t_cold, size=u))
    cold = rng.permutation(u)[:num_cold]
    signup[cold] = rng.integers(t_cold, _cold_end(spec), size=num_cold)

    width = max(6, len(str(u - 1)))
    user_ids = np.array([f"U{i:0{width}d}" for i in range(u)], dtype=object)
    users = pd.DataFrame({"user_id": user_ids, "signup_ts": signup.astype(np.int64)})
    truth.update({
        "user_ids": user_ids.astype(str), "user_w0": w0, "user_w1": w1,
        "user_fav_brands": fav_brands.astype(np.int32),
        "user_brand_bonus": rng.uniform(0.6, 1.4, u).astype(np.float32),
        "user_price_mu": rng.normal(0.0, 0.35, u).astype(np.float32),
        "user_price_sigma": rng.uniform(0.25, 0.7, u).astype(np.float32),
        "user_device": rng.choice(len(DEVICES), u, p=[0.35, 0.4, 0.1, 0.15]).astype(np.int32),
        "user_activity": rng.lognormal(-0.18, 0.6, u).astype(np.float32),
        "user_signup_ts": signup.astype(np.int64),
    })
    return users


# --------------------------------------------------------------------------------
# True utility, shared by the simulator and the oracle.
# --------------------------------------------------------------------------------

def true_utility(truth: Dict[str, np.ndarray], spec: WorldSpec, users: np.ndarray,
                 items: np.ndarray, ts: Union[int, np.ndarray]) -> np.ndarray:
    """u(user, item, t) = log category weight(t) + brand affinity + price fit + beta*log pop.

    One function serves the simulator (pairs) and the oracle (user x item grids), so
    the oracle ranks by exactly the utility that generated the clicks.

    Args:
      truth: the world's ground truth arrays.
      spec: the world's spec (drift, popularity weight, time range).
      users, items, ts: broadcastable index/time arrays, e.g. [n, 1] x [1, m].
    """
    span = float(spec.t_end - spec.t_start)
    mix = spec.drift * np.clip((np.asarray(ts, dtype=np.float64) - spec.t_start) / span, 0, 1)
    leaf = truth["item_leaf"][items]
    w = (1.0 - mix) * truth["user_w0"][users, leaf] + mix * truth["user_w1"][users, leaf]
    utility = np.log(w + CATEGORY_EPS)
    brand = truth["item_brand"][items]
    favs = truth["user_fav_brands"]
    liked = np.zeros(np.broadcast_shapes(np.shape(users), np.shape(items)), dtype=bool)
    for slot in range(favs.shape[1]):
        liked |= brand == favs[users, slot]
    utility = utility + liked * truth["user_brand_bonus"][users]
    z = (truth["item_rel_price"][items] - truth["user_price_mu"][users]) / \
        truth["user_price_sigma"][users]
    utility = utility - 0.5 * z * z + spec.popularity_beta * truth["item_log_pop"][items]
    return utility.astype(np.float32)


def shopper_funnel(truth: Dict[str, np.ndarray], spec: WorldSpec, users: np.ndarray,
                   items: np.ndarray, positions: np.ndarray, ts: Union[int, np.ndarray],
                   rng: np.random.Generator, is_target: Optional[np.ndarray] = None
                   ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Clicks, carts and purchases of users shown `items` at `positions` (0 = top).

    The world's behaviour model: clicks follow true utility and a position bias, carts
    follow clicks, purchases follow carts. The simulator and simulated shoppers of an
    online experiment share it, so served lists are judged as the logs were generated.

    Args:
      truth / spec: the world's ground truth and spec.
      users, items, positions, ts: one entry per impression.
      rng: draws of the funnel.
      is_target: impressions of the item a search session looks for (bonus).

    Returns:
      (clicked, carted, purchased) boolean arrays.
    """
    n = len(items)
    target = np.zeros(n, dtype=bool) if is_target is None else np.asarray(is_target)
    utility = true_utility(truth, spec, users, items, ts)
    click_logit = _click_logit(utility, positions, target) + rng.normal(0, _CLICK_NOISE, n)
    clicked = rng.random(n) < _sigmoid(click_logit)
    cart_logit = _CART_BIAS + 0.5 * utility + 0.8 * target
    carted = clicked & (rng.random(n) < _sigmoid(cart_logit))
    purchased = carted & (rng.random(n) < _sigmoid(_PURCHASE_BIAS + 0.3 * utility))
    return clicked, carted, purchased


# --------------------------------------------------------------------------------
# Queries.
# --------------------------------------------------------------------------------

def _typo(word: str, r1: float, r2: float) -> str:
    i = int(r2 * (len(word) - 1))
    op = int(r1 * 3)
    if op == 0 and word[i] != word[i + 1]:  # swap neighbours
        return word[:i] + word[i + 1] + word[i] + word[i + 2:]
    if op == 1:  # drop a letter
        return word[:i] + word[i + 1:]
    return word[:i] + word[i] + word[i:]  # double a letter


def _make_query(truth: Dict[str, np.ndarray], vocab: _Vocab, item: int, r: np.ndarray,
                spec: WorldSpec):
    """Paraphrases an item's title the way shoppers type: partial, synonyms, typos.

    Returns (query, used_synonym, has_typo).
    """
    words = vocab.group_words[truth["item_group"][item]]
    title_word = int(truth["item_word"][item])
    synonym = len(words) > 1 and r[0] < spec.synonym_rate
    if synonym:
        noun = words[(title_word + 1 + int(r[1] * (len(words) - 1))) % len(words)]
    else:
        noun = words[title_word]
    dept = truth["leaf_dept"][truth["item_leaf"][item]]
    tokens = []
    if r[2] < 0.15:
        tokens.append(vocab.modifiers[int(r[3] * len(vocab.modifiers))])
    if r[4] < 0.35:
        tokens.append(str(truth["brand_names"][truth["item_brand"][item]]).lower())
    if truth["item_color"][item] >= 0 and r[5] < 0.5:
        tokens.append(vocab.colors[truth["item_color"][item]])
    if truth["item_attr"][item] >= 0 and r[6] < 0.5:
        tokens.append(vocab.attributes[dept][truth["item_attr"][item]])
    if truth["item_material"][item] >= 0 and r[7] < 0.4:
        tokens.append(vocab.materials[dept][truth["item_material"][item]])
    tokens.append(noun)
    model = str(truth["item_model"][item])
    if model and r[8] < 0.3:
        tokens.append(model.lower())
    typo = False
    if r[9] < spec.typo_rate:
        if vocab.lang == "zh":
            candidates = [j for j, t in enumerate(tokens) if any(c in zh.HOMOPHONES_ZH for c in t)]
        else:
            candidates = [j for j, t in enumerate(tokens) if len(t) >= 4 and t.isalpha()]
        if candidates:
            j = candidates[int(r[10] * len(candidates))]
            changed = (_typo_zh if vocab.lang == "zh" else _typo)(tokens[j], r[11], r[12])
            typo = changed != tokens[j]
            tokens[j] = changed
    return (_join_zh(tokens) if vocab.lang == "zh" else " ".join(tokens)), synonym, typo


def _typo_zh(word: str, r1: float, r2: float) -> str:
    """One character replaced by its homophone (a pinyin input slip)."""
    slots = [i for i, c in enumerate(word) if c in zh.HOMOPHONES_ZH]
    i = slots[int(r2 * len(slots))]
    return word[:i] + zh.HOMOPHONES_ZH[word[i]] + word[i + 1:]


def _join_zh(tokens: List[str]) -> str:
    """Chinese words run together; a Latin token (model number) keeps spaces around it."""
    out = ""
    for t in tokens:
        latin = t.isascii()
        if out and (latin or out[-1].isascii()):
            out += " "
        out += t
    return out


# --------------------------------------------------------------------------------
# Sessions and events.
# --------------------------------------------------------------------------------

def _session_times(spec: WorldSpec, truth: Dict[str, np.ndarray], rng: np.random.Generator,
                   users: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Sessions (user index, start second) of `users`, sorted by time.

    Takes a subset of users so a streamed world simulates them chunk by chunk; all
    users in index order draw exactly what a whole world does.

    Args:
      spec, truth: the world's spec and ground truth.
      rng: draws of counts and times.
      users: user indices (into the truth arrays) to simulate, ascending.

    Returns:
      (user, ts): one entry per session, ordered by (ts, user).
    """
    span = spec.t_end - spec.t_start
    active_start = np.maximum(truth["user_signup_ts"][users], spec.t_start)
    last = spec.t_end - 3600  # a session's events fit before the end
    active = np.clip((last - active_start) / span, 0.0, 1.0)
    rate = spec.sessions_per_user * truth["user_activity"][users] * active
    counts = np.maximum(1, rng.poisson(rate))
    user = np.repeat(users, counts)
    lo = np.repeat(active_start, counts)
    t = lo + (rng.random(len(user)) * (last - lo)).astype(np.int64)
    # Keep the day, redraw the hour from the daily traffic pattern.
    day = (t - spec.t_start) // DAY
    hour = rng.choice(24, len(user), p=HOUR_WEIGHTS / HOUR_WEIGHTS.sum())
    shaped = spec.t_start + day * DAY + hour * 3600 + rng.integers(0, 3600, len(user))
    ts = np.where((shaped >= lo) & (shaped < last), shaped, t)
    order = np.lexsort((user, ts))
    return user[order], ts[order].astype(np.int64)


def _pick_targets(truth, spec, user, ts, leaf, rng, chunk_cells=2_000_000):
    """Chooses each search session's target item in its leaf, softmax over utility."""
    target = np.full(len(user), -1, dtype=np.int64)
    item_leaf = truth["item_leaf"]
    order = np.argsort(item_leaf, kind="stable")
    bounds = np.searchsorted(item_leaf[order], np.arange(len(truth["leaf_names"]) + 1))
    for lf in np.unique(leaf):
        sessions = np.flatnonzero(leaf == lf)
        items = order[bounds[lf]:bounds[lf + 1]]
        step = max(1, chunk_cells // max(1, len(items)))
        for c in range(0, len(sessions), step):
            s = sessions[c:c + step]
            score = true_utility(truth, spec, user[s][:, None], items[None, :], ts[s][:, None])
            score = score + rng.gumbel(size=score.shape).astype(np.float32)
            score[truth["item_created_ts"][items][None, :] > ts[s][:, None]] = -np.inf
            best = np.argmax(score, axis=1)
            ok = np.isfinite(score[np.arange(len(s)), best])
            target[s[ok]] = items[best[ok]]
    return target


@dataclass
class _CatalogSamplers:
    """Item samplers of the simulator; they depend on the catalog only, so a streamed
    world builds them once instead of once per chunk (a 1M-item sort each)."""

    pop: np.ndarray  # popularity (exp log pop), float64
    by_leaf: _GroupSampler
    by_dept: _GroupSampler
    overall: _GroupSampler


def _catalog_samplers(truth: Dict[str, np.ndarray], vocab: _Vocab) -> _CatalogSamplers:
    """Builds the simulator's item samplers (no random draws: streams are unchanged).

    Args:
      truth: ground truth holding the catalog arrays.
      vocab: the world's vocabulary (leaf and department counts).

    Returns:
      The samplers of candidates by leaf, by department and overall.
    """
    pop = np.exp(truth["item_log_pop"].astype(np.float64))
    item_leaf = truth["item_leaf"]
    item_dept = truth["leaf_dept"][item_leaf]
    return _CatalogSamplers(
        pop=pop, by_leaf=_GroupSampler(item_leaf, pop ** 0.7, len(vocab.leaf_names)),
        by_dept=_GroupSampler(item_dept, pop ** 0.7, len(vocab.departments)),
        overall=_GroupSampler(np.zeros(len(pop), dtype=np.int64), pop, 1))


def _simulate(spec: WorldSpec, vocab: _Vocab, truth: Dict[str, np.ndarray],
              rng: np.random.Generator) -> pd.DataFrame:
    """Events of all users at once; adds the search log (`query_*`) to `truth`."""
    sim = _simulate_sessions(spec, vocab, truth, rng, np.arange(spec.num_users))
    truth.update(sim.queries)
    return sim.events


class _Simulation(NamedTuple):
    """What `_simulate_sessions` made: the events, the search log and the session count
    (sessions without events included: the next chunk's ids start after them)."""

    events: pd.DataFrame
    queries: Dict[str, np.ndarray]
    num_sessions: int


def _simulate_sessions(spec: WorldSpec, vocab: _Vocab, truth: Dict[str, np.ndarray],
                       rng: np.random.Generator, users: np.ndarray, session_offset: int = 0,
                       samplers: Optional[_CatalogSamplers] = None) -> _Simulation:
    """Sessions and events of a set of users: the world's behaviour simulation.

    A streamed world calls it per chunk of users with its own random stream and the
    count of sessions before it, so session ids stay unique across chunks.

    Args:
      spec, vocab, truth: the world's spec, vocabulary and ground truth (catalog and
        users); `truth` is not modified.
      rng: this call's random stream.
      users: user indices to simulate, ascending.
      session_offset: number of the first session (ids are `S` + zero-padded number,
        at least 7 digits).
      samplers: item samplers from `_catalog_samplers` (built here when None).

    Returns:
      The events table (unvalidated, sorted by time), the search log of these sessions
      (`query_session_ids`, `query_texts`, `query_target`, `query_synonym`,
      `query_typo`) and the number of sessions simulated.

    Raises:
      ValueError: `users` is empty or `session_offset` negative.
    """
    if len(users) == 0:
        raise ValueError("_simulate_sessions needs at least one user")
    if session_offset < 0:
        raise ValueError(f"session_offset must be >= 0, got {session_offset}")
    user, ts = _session_times(spec, truth, rng, np.asarray(users, dtype=np.int64))
    num_sessions = len(user)
    span = spec.t_end - spec.t_start
    num_leaves = len(vocab.leaf_names)
    device = np.where(rng.random(num_sessions) < 0.8, truth["user_device"][user],
                      rng.integers(len(DEVICES), size=num_sessions))

    # Category weights at session time; search sessions pick a target leaf from them.
    mix = (spec.drift * (ts - spec.t_start) / span)[:, None].astype(np.float32)
    weights = (1 - mix) * truth["user_w0"][user] + mix * truth["user_w1"][user]
    cum = np.cumsum(weights, axis=1)
    draw = rng.random(num_sessions)[:, None] * cum[:, -1:]
    leaf = np.minimum((cum < draw).sum(axis=1), num_leaves - 1)
    is_search = rng.random(num_sessions) < spec.search_fraction
    target = np.full(num_sessions, -1, dtype=np.int64)
    search = np.flatnonzero(is_search)
    target[search] = _pick_targets(truth, spec, user[search], ts[search], leaf[search], rng)
    is_search &= target >= 0  # no item of the leaf existed yet: browse instead

    # Candidates: search shows the target's leaf (some department), browse mixes
    # preferred leaves with globally popular items.
    k = spec.impressions_per_session
    samplers = samplers or _catalog_samplers(truth, vocab)
    pop, item_leaf = samplers.pop, truth["item_leaf"]
    sess = np.repeat(np.arange(num_sessions), k)
    slot = np.tile(np.arange(k), num_sessions)
    searching = is_search[sess]
    t_leaf = np.where(searching, item_leaf[np.maximum(target[sess], 0)], 0)
    # Browse slots draw a leaf from the session's weights: one sampler over all
    # (session, leaf) cells avoids a [slots, leaves] cumulative matrix.
    session_leaves = _GroupSampler(np.repeat(np.arange(num_sessions), num_leaves),
                                   weights.ravel().astype(np.float64), num_sessions)
    browse_leaf = session_leaves.sample(sess, rng) % num_leaves
    u = rng.random(len(sess))
    from_leaf = samplers.by_leaf.sample(np.where(searching, t_leaf, browse_leaf), rng)
    from_dept = samplers.by_dept.sample(vocab.leaf_dept[t_leaf], rng)
    popular = samplers.overall.sample(np.zeros(len(sess), dtype=np.int64), rng)
    cand = np.where(searching, np.where(u < 0.75, from_leaf, from_dept),
                    np.where(u < 0.6, from_leaf, popular))
    show_target = searching & (slot == 0) & (rng.random(len(sess)) < 0.85)
    cand = np.where(show_target, target[sess], cand)

    # Items must exist; each item shows once per session (the target wins).
    keep = truth["item_created_ts"][cand] <= ts[sess]
    sess, cand = sess[keep], cand[keep]
    _, first = np.unique(sess * len(pop) + cand, return_index=True)
    first.sort()
    sess, cand = sess[first], cand[first]
    is_target = cand == target[sess]

    # Noisy logging policy ranks the slate; users stop scrolling at a random depth.
    fresh = (ts[sess] - truth["item_created_ts"][cand]) < 14 * DAY
    log_score = (0.5 * truth["item_log_pop"][cand] + 0.7 * fresh
                 + is_search[sess] * (2.0 * is_target
                                      + 1.0 * (item_leaf[cand] == item_leaf[target[sess]])
                                      + 0.5 * (truth["item_brand"][cand]
                                               == truth["item_brand"][target[sess]]))
                 + rng.gumbel(size=len(sess)))
    order = np.lexsort((-log_score, sess))
    sess, cand, is_target = sess[order], cand[order], is_target[order]
    starts = np.searchsorted(sess, np.arange(num_sessions))
    position = np.arange(len(sess)) - starts[sess]
    depth = rng.integers(_min_depth(k), k + 1, size=num_sessions)
    seen = position < depth[sess]
    sess, cand, is_target, position = sess[seen], cand[seen], is_target[seen], position[seen]

    clicked, carted, purchased = shopper_funnel(truth, spec, user[sess], cand, position,
                                                ts[sess], rng, is_target)

    click_ts = ts[sess] + 5 + 6 * position + rng.integers(0, 30, len(sess))
    cart_ts = click_ts + rng.integers(10, 300, len(sess))
    purchase_ts = cart_ts + rng.integers(30, 900, len(sess))

    type_code = {name: i for i, name in enumerate(EVENT_TYPES)}
    searched = np.flatnonzero(is_search)
    no_position = np.full(len(sess), -1)
    parts = [  # (ts, session, event type, item, position)
        (ts[searched], searched, type_code["search"], np.full(len(searched), -1),
         np.full(len(searched), -1)),
        (ts[sess] + 2, sess, type_code["impression"], cand, position),
        (click_ts[clicked], sess[clicked], type_code["click"], cand[clicked], position[clicked]),
        (cart_ts[carted], sess[carted], type_code["add_to_cart"], cand[carted],
         no_position[carted]),
        (purchase_ts[purchased], sess[purchased], type_code["purchase"], cand[purchased],
         no_position[purchased]),
    ]
    ev_ts = np.concatenate([p[0] for p in parts]).astype(np.int64)
    ev_sess = np.concatenate([p[1] for p in parts])
    ev_type = np.concatenate([np.full(len(p[1]), p[2]) for p in parts])
    ev_item = np.concatenate([p[3] for p in parts]).astype(np.int64)
    ev_pos = np.concatenate([p[4] for p in parts]).astype(np.int64)
    order = np.lexsort((ev_pos, ev_type, ev_sess, ev_ts))
    ev_ts, ev_sess, ev_type = ev_ts[order], ev_sess[order], ev_type[order]
    ev_item, ev_pos = ev_item[order], ev_pos[order]

    # Queries, one per search session.
    queries = np.full(num_sessions, "", dtype=object)
    search = np.flatnonzero(is_search)
    draws = rng.random((len(search), 13))
    synonym = np.zeros(len(search), dtype=bool)
    typo = np.zeros(len(search), dtype=bool)
    for j, s in enumerate(search):
        queries[s], synonym[j], typo[j] = _make_query(truth, vocab, int(target[s]), draws[j],
                                                       spec)

    # Ids of whole worlds keep their width; past 10M sessions they grow a digit and
    # stay unique (a longer number never equals a zero-padded shorter one).
    last_id = session_offset + num_sessions - 1
    width = max(7, len(str(last_id)))
    session_ids = np.array([f"S{i:0{width}d}" for i in range(session_offset, last_id + 1)],
                           dtype=object)
    item_ids = np.append(truth["item_ids"].astype(object), "")  # index -1 -> ""
    events = pd.DataFrame({
        "ts": ev_ts,
        "user_id": truth["user_ids"].astype(object)[user[ev_sess]],
        "session_id": session_ids[ev_sess],
        "event_type": np.array(EVENT_TYPES, dtype=object)[ev_type],
        "item_id": item_ids[ev_item],
        "query": queries[ev_sess],
        "device": np.array(DEVICES, dtype=object)[device[ev_sess]],
        "position": ev_pos,
    })
    return _Simulation(events, {
        "query_session_ids": session_ids[search].astype(str),
        "query_texts": queries[search].astype(str),
        "query_target": target[search].astype(np.int64),
        "query_synonym": synonym, "query_typo": typo,
    }, num_sessions)


def _click_logit(utility: np.ndarray, positions: np.ndarray,
                 is_target: np.ndarray) -> np.ndarray:
    """Click logit before the noise: utility, position and the searched-for item."""
    return (_CLICK_BIAS + _CLICK_SCALE * utility - 0.5 * np.log1p(positions)
            + _TARGET_BONUS * is_target)


def _min_depth(k: int) -> int:
    """Shoppers scroll to a depth uniform on _min_depth(k)..k of a k-item list."""
    return max(2, k // 2)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


# --------------------------------------------------------------------------------
# The world.
# --------------------------------------------------------------------------------

@dataclass
class World:
    """Tables of a synthetic world plus the ground truth that generated them.

    Attributes:
      spec: the WorldSpec used.
      seed: the generation seed.
      catalog, users, events: validated tables; events sorted by ts.
      ground_truth: numpy arrays of latent user preferences, item attributes and
        search targets (`query_*`), aligned with catalog and users row order.
    """

    spec: WorldSpec
    seed: int
    catalog: pd.DataFrame
    users: pd.DataFrame
    events: pd.DataFrame
    ground_truth: Dict[str, np.ndarray]

    @property
    def t_start(self) -> int:
        return self.spec.t_start

    @property
    def t_end(self) -> int:
        return self.spec.t_end

    @property
    def item_ids(self) -> np.ndarray:
        return self.catalog["item_id"].to_numpy()

    def _index(self, name: str) -> Dict[str, int]:
        cache = self.__dict__.setdefault("_indices", {})
        if name not in cache:
            ids = self.ground_truth["item_ids" if name == "item" else "user_ids"]
            cache[name] = {str(v): i for i, v in enumerate(ids)}
        return cache[name]

    def react(self, user_id: str, item_ids: Sequence[str], ts: int,
              rng: np.random.Generator, target: Optional[str] = None) -> pd.DataFrame:
        """How a shopper reacts to a served list: the world's behaviour model.

        The shopper scrolls to a random depth (as in the simulated logs), then clicks,
        carts and buys by true utility and position. Unknown users and items (ids the
        world does not have, "" padding) are never clicked.

        Args:
          user_id: the shopper.
          item_ids: the list as shown, top first.
          ts: unix seconds of the request.
          rng: draws of depth and funnel.
          target: the item a searching shopper looks for (clicked more readily).

        Returns:
          One row per seen item: position, item_id, clicked, carted, purchased.
        """
        items = self._index("item")
        user = self._index("user").get(str(user_id), -1)
        shown = [(j, str(i), items.get(str(i), -1)) for j, i in enumerate(item_ids)]
        k = len(shown)
        depth = int(rng.integers(_min_depth(k), k + 1)) if k else 0
        seen = [s for s in shown[:depth] if s[2] >= 0 and user >= 0]
        frame = pd.DataFrame({"position": [s[0] for s in seen],
                              "item_id": [s[1] for s in seen]})
        if not seen:
            for column in ("clicked", "carted", "purchased"):
                frame[column] = np.zeros(0, dtype=bool)
            return frame
        index = np.array([s[2] for s in seen], dtype=np.int64)
        clicked, carted, purchased = shopper_funnel(
            self.ground_truth, self.spec, np.full(len(seen), user), index,
            frame["position"].to_numpy(), ts, rng,
            is_target=(frame["item_id"] == target).to_numpy() if target else None)
        return frame.assign(clicked=clicked, carted=carted, purchased=purchased)

    def expected_clicks(self, user_id: str, item_ids: Sequence[str], ts: int,
                        target: Optional[str] = None) -> float:
        """Expected clicks on a served list under the behaviour model `react` draws from.

        Scroll depth and click noise are integrated out (the noise by Gauss-Hermite
        quadrature), so an off-policy estimate can be checked against the truth on the
        very requests it was computed from.

        Args:
          user_id / item_ids / ts / target: as `react`.

        Returns:
          The mean number of clicks `react` gives this list (0 for an unknown user).
        """
        items = self._index("item")
        user = self._index("user").get(str(user_id), -1)
        k = len(item_ids)
        if not k or user < 0:
            return 0.0
        index = np.array([items.get(str(i), -1) for i in item_ids], dtype=np.int64)
        known = index >= 0
        if not known.any():
            return 0.0
        positions = np.arange(k)
        depths = np.arange(_min_depth(k), k + 1)
        seen = (depths[None, :] > positions[:, None]).mean(axis=1)
        utility = true_utility(self.ground_truth, self.spec, np.full(k, user),
                               np.where(known, index, 0), np.full(k, ts))
        is_target = np.array([target is not None and str(i) == target for i in item_ids])
        logit = _click_logit(utility, positions, is_target)
        nodes, weights = np.polynomial.hermite_e.hermegauss(24)
        click = _sigmoid(logit[:, None] + _CLICK_NOISE * nodes[None, :]) @ (
            weights / weights.sum())
        return float(np.sum(seen * click * known))

    def search_intent(self, rng: np.random.Generator) -> Tuple[str, str]:
        """A (query text, target item id) drawn from the world's search log: what a
        simulated shopper searches for."""
        truth = self.ground_truth
        if not len(truth["query_texts"]):
            raise ValueError("this world has no search sessions (search_fraction 0)")
        i = int(rng.integers(len(truth["query_texts"])))
        return str(truth["query_texts"][i]), str(truth["item_ids"][truth["query_target"][i]])

    def oracle_scores(self, user_ids: Sequence[str], ts: int) -> np.ndarray:
        """True utility of every catalog item for each user at time `ts`.

        Items created after `ts` do not exist yet and score -inf; unknown users
        get popularity only (what a system knows about a stranger).

        Args:
          user_ids: users to score.
          ts: unix seconds.

        Returns:
          float32 [len(user_ids), num_items], columns in catalog order.
        """
        index = self._index("user")
        users = np.array([index.get(str(u), -1) for u in user_ids], dtype=np.int64)
        truth = self.ground_truth
        n_items = len(truth["item_ids"])
        scores = np.empty((len(users), n_items), dtype=np.float32)
        scores[:] = self.spec.popularity_beta * truth["item_log_pop"][None, :]
        known = np.flatnonzero(users >= 0)
        if len(known):
            scores[known] = true_utility(truth, self.spec, users[known][:, None],
                                         np.arange(n_items)[None, :], ts)
        scores[:, truth["item_created_ts"] > ts] = -np.inf
        return scores

    def oracle_topk(self, user_ids: Sequence[str], ts: int, k: int,
                    exclude: Optional[Dict[str, Set[str]]] = None,
                    chunk_cells: int = 4_000_000) -> List[List[str]]:
        """The k items each user truly prefers at `ts` (a recall ceiling for models).

        Args:
          user_ids: users to rank for.
          ts: unix seconds; items created later are excluded.
          k: list length (shorter if fewer items exist).
          exclude: per user, item ids to leave out (e.g. already purchased).
          chunk_cells: users x items scored at once; bounds memory at 1M items.
        """
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        item_index = self._index("item")
        item_ids = self.ground_truth["item_ids"]
        n_items = len(item_ids)
        k = min(k, n_items)
        step = max(1, chunk_cells // n_items)
        result: List[List[str]] = []
        for c in range(0, len(user_ids), step):
            chunk = list(user_ids[c:c + step])
            scores = self.oracle_scores(chunk, ts)
            if exclude:
                for row, user in enumerate(chunk):
                    cols = [item_index[i] for i in exclude.get(user, ()) if i in item_index]
                    scores[row, cols] = -np.inf
            top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
            top_scores = np.take_along_axis(scores, top, axis=1)
            order = np.argsort(-top_scores, axis=1, kind="stable")
            top = np.take_along_axis(top, order, axis=1)
            top_scores = np.take_along_axis(top_scores, order, axis=1)
            for row in range(len(chunk)):
                valid = np.isfinite(top_scores[row])
                result.append([str(item_ids[i]) for i in top[row][valid]])
        return result

    def oracle_rerank(self, user_ids: Sequence[str], candidates: np.ndarray, ts: int,
                      chunk: int = 256) -> np.ndarray:
        """Each user's candidate ids re-ordered by true utility at `ts`.

        The ceiling of any ranker that re-orders the same candidates (unknown ids last).

        Args:
          user_ids: one user per candidate row.
          candidates: [U, K] item ids.
          ts: unix seconds.
          chunk: users scored at once.
        """
        item_index = self._index("item")
        cols = np.array([[item_index.get(str(i), -1) for i in row] for row in candidates],
                        dtype=np.int64).reshape(np.shape(candidates))
        out = np.empty_like(np.asarray(candidates, dtype=object))
        for start in range(0, len(user_ids), chunk):
            scores = self.oracle_scores(list(user_ids[start:start + chunk]), ts)
            block = cols[start:start + chunk]
            utility = np.take_along_axis(scores, np.maximum(block, 0), axis=1)
            utility = np.where(block >= 0, utility, -np.inf)
            order = np.argsort(-utility, axis=1, kind="stable")
            out[start:start + chunk] = np.take_along_axis(
                np.asarray(candidates[start:start + chunk], dtype=object), order, axis=1)
        return out

    def save(self, data_dir: str) -> None:
        """Writes tables (.parquet), ground_truth.npz and world.json, each atomically."""
        os.makedirs(data_dir, exist_ok=True)
        for name in ("catalog", "users", "events"):
            write_table(getattr(self, name), os.path.join(data_dir, f"{name}.parquet"))
        save_ground_truth(os.path.join(data_dir, "ground_truth.npz"), self.ground_truth)
        save_world_meta(os.path.join(data_dir, "world.json"), world_meta(
            self.spec, self.seed, len(self.catalog), len(self.users), len(self.events)))

    @classmethod
    def load(cls, data_dir: str) -> "World":
        """Reads a world written by `save`."""
        meta_path = os.path.join(data_dir, "world.json")
        if not os.path.isfile(meta_path):
            raise FileNotFoundError(
                f"no synthetic world in {data_dir!r} (world.json missing); run "
                f"`tfrec generate` first")
        with open(meta_path) as f:
            meta = json.load(f)
        if meta.get("events_layout", "table") != "table":
            raise ValueError(
                f"the world in {data_dir!r} was streamed (events_layout "
                f"{meta['events_layout']!r}: events in events/part-*.parquet, no search "
                f"ground truth); World.load reads only worlds written whole by "
                f"World.save; read its parts with "
                f"tfrec.data.synthetic_stream.event_part_paths")
        spec = WorldSpec(**meta["spec"])
        with np.load(os.path.join(data_dir, "ground_truth.npz"), allow_pickle=False) as npz:
            truth = {name: npz[name] for name in npz.files}
        tables = {name: read_table(os.path.join(data_dir, f"{name}.parquet"), name)
                  for name in ("catalog", "users", "events")}
        return cls(spec=spec, seed=int(meta["seed"]), ground_truth=truth, **tables)


def world_meta(spec: WorldSpec, seed: int, num_items: int, num_users: int,
               num_events: int) -> dict:
    """The world.json content of a world: spec, seed, time range and table sizes.

    Args:
      spec, seed: what generated the world.
      num_items, num_users, num_events: rows of its tables.

    Returns:
      A JSON-ready dict (a streamed world adds its layout keys).
    """
    return {"spec": dataclasses.asdict(spec), "seed": seed, "t_start": spec.t_start,
            "t_end": spec.t_end, "num_items": num_items, "num_users": num_users,
            "num_events": num_events}


def save_world_meta(path: str, meta: dict) -> str:
    """Writes world.json atomically: its presence marks a complete world.

    Args:
      path: destination file.
      meta: from `world_meta`, possibly extended.

    Returns:
      `path`.
    """
    def write_json(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(meta, f, indent=2)

    return atomic_write(path, write_json)


def save_ground_truth(path: str, truth: Dict[str, np.ndarray]) -> str:
    """Writes ground-truth arrays as a compressed .npz, atomically.

    Args:
      path: destination file.
      truth: name -> numpy array (no object arrays: loading disallows pickles).

    Returns:
      `path`.
    """
    def write_npz(tmp: str) -> None:
        with open(tmp, "wb") as f:  # a file object stops numpy appending ".npz"
            np.savez_compressed(f, **truth)

    return atomic_write(path, write_npz)


def generate_world(spec: Union[WorldSpec, str] = "small", seed: int = 42) -> World:
    """Generates a synthetic world; the same (spec, seed) gives identical tables.

    Catalog, users and behaviour use independent random streams, so e.g. a
    different user count keeps the same catalog.

    Args:
      spec: a WorldSpec or a preset name from WORLD_PRESETS.
      seed: random seed.
    """
    spec = get_spec(spec)
    streams = [np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(3)]
    vocab = _vocab(spec.lang)
    catalog, truth = _make_catalog(spec, vocab, streams[0])
    users = _make_users(spec, truth, streams[1])
    events = _simulate(spec, vocab, truth, streams[2])
    return World(spec=spec, seed=seed, catalog=validate_table(catalog, "catalog"),
                 users=validate_table(users, "users"),
                 events=validate_table(events, "events"), ground_truth=truth)
