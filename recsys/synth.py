"""Synthetic H&M data: the three Kaggle CSVs, byte-compatible, with a latent structure worth learning.

Why: the project cannot download the real data, yet every stage (ingest, features, training, evaluation) must
run on files shaped exactly like Kaggle's, with the statistics that make recommendation meaningful. The
generator plants a taste per customer (segment shaped by age: index group, product group, colour, price level),
article life cycles (launch, rise, decay) with heavy-tailed popularity, repeat purchases, same-day baskets,
duplicate rows, channel preferences and weekly seasonality. `recsys.realism` measures the same statistics as
DATA.md so the realism claim can be checked, not just asserted.

Everything is vectorised numpy; transactions are simulated day by day and written in weekly chunks, so memory
stays bounded at full scale (31.8 M rows).
"""
from __future__ import annotations

import csv
import hashlib
import math
import time
from dataclasses import dataclass
from datetime import date, timedelta
from decimal import ROUND_DOWN, Decimal
from pathlib import Path

import numpy as np
import pandas as pd

from recsys.config import SynthConfig, landing_beside
from recsys.tables import ARTICLE_INT_COLUMNS, ARTICLES, CUSTOMERS, RAW_COLUMNS, RAW_FILES, TRANSACTIONS, drop_file

# --- vocabulary (hand-written, H&M-like; not copied from the real files) --------------------------------------
# index_group_no, name, share of the real catalogue
INDEX_GROUPS = [(1, "Ladieswear", 0.3765), (4, "Baby/Children", 0.3289), (2, "Divided", 0.1435),
                (3, "Menswear", 0.1189), (26, "Sport", 0.0321)]
# index_code, index_name, index group position in INDEX_GROUPS, weight inside the group
INDEXES = [("A", "Ladieswear", 0, 0.66), ("B", "Lingeries/Tights", 0, 0.22), ("C", "Ladies Accessories", 0, 0.12),
           ("G", "Baby Sizes 50-98", 1, 0.25), ("H", "Children Sizes 92-140", 1, 0.35),
           ("I", "Children Sizes 134-170", 1, 0.28), ("J", "Children Accessories, Swimwear", 1, 0.12),
           ("D", "Divided", 2, 1.0), ("F", "Menswear", 3, 1.0), ("S", "Sport", 4, 1.0)]
# product group, weight, SEK price centre, garment group, product types (type, no)
PRODUCT_GROUPS = [
    ("Garment Upper body", 0.40, 22.0, (1002, "Jersey Basic"),
     [("T-shirt", 255), ("Top", 254), ("Vest top", 253), ("Blouse", 258), ("Shirt", 259), ("Sweater", 252),
      ("Cardigan", 245), ("Hoodie", 308), ("Polo shirt", 304), ("Blazer", 264), ("Jacket", 262), ("Coat", 267)]),
    ("Garment Lower body", 0.19, 25.0, (1009, "Trousers"),
     [("Trousers", 272), ("Shorts", 274), ("Skirt", 275), ("Leggings/Tights", 273), ("Jeans", 276)]),
    ("Garment Full body", 0.13, 30.0, (1013, "Dresses Ladies"),
     [("Dress", 265), ("Jumpsuit/Playsuit", 296), ("Dungarees", 270), ("Garment Set", 268)]),
    ("Accessories", 0.11, 9.0, (1019, "Accessories"),
     [("Bag", 66), ("Hat/beanie", 67), ("Scarf", 87), ("Belt", 81), ("Earring", 72), ("Necklace", 74),
      ("Hair clip", 79), ("Sunglasses", 78), ("Gloves", 71), ("Cap/peaked", 69)]),
    ("Underwear", 0.055, 12.0, (1017, "Under-, Nightwear"),
     [("Bra", 306), ("Underwear bottom", 286), ("Underwear body", 298), ("Underwear Tights", 304)]),
    ("Shoes", 0.05, 35.0, (1020, "Shoes"),
     [("Sneakers", 93), ("Boots", 91), ("Sandals", 92), ("Flat shoe", 94), ("Pumps", 96)]),
    ("Swimwear", 0.03, 15.0, (1018, "Swimwear"),
     [("Bikini top", 59), ("Swimwear bottom", 60), ("Swimsuit", 57)]),
    ("Socks & Tights", 0.025, 6.0, (1021, "Socks and Tights"),
     [("Socks", 302), ("Tights", 303)]),
    ("Nightwear", 0.015, 18.0, (1017, "Under-, Nightwear"),
     [("Pyjama set", 285), ("Night gown", 287), ("Pyjama jumpsuit/playsuit", 289)]),
    ("Unknown", 0.004, 15.0, (1001, "Unknown"), [("Unknown", -1)]),
    ("Underwear/nightwear", 0.003, 15.0, (1017, "Under-, Nightwear"), [("Underdress", 525)]),
    ("Cosmetic", 0.002, 7.0, (1019, "Accessories"), [("Nail polish", 539), ("Lip gloss", 540)]),
    ("Bags", 0.002, 20.0, (1019, "Accessories"), [("Backpack", 65), ("Tote bag", 64)]),
    ("Items", 0.002, 10.0, (1019, "Accessories"), [("Umbrella", 83), ("Wallet", 84)]),
    ("Furniture", 0.001, 40.0, (1019, "Accessories"), [("Chair", 531)]),
    ("Garment and Shoe care", 0.001, 6.0, (1019, "Accessories"), [("Clothing mist", 532)]),
    ("Stationery", 0.001, 4.0, (1019, "Accessories"), [("Marker pen", 533)]),
    ("Interior textile", 0.001, 12.0, (1019, "Accessories"), [("Blanket", 534), ("Cushion", 536)]),
    ("Fun", 0.001, 8.0, (1019, "Accessories"), [("Toy", 537)]),
]
# colour_group_code, colour name, perceived master id, master name
COLOURS = [(9, "Black", 5, "Black"), (10, "White", 9, "White"), (11, "Off White", 9, "White"),
           (8, "Dark Grey", 12, "Grey"), (7, "Grey", 12, "Grey"), (6, "Light Grey", 12, "Grey"),
           (73, "Dark Blue", 2, "Blue"), (72, "Blue", 2, "Blue"), (71, "Light Blue", 2, "Blue"),
           (13, "Beige", 11, "Beige"), (12, "Light Beige", 11, "Beige"), (15, "Dark Beige", 11, "Beige"),
           (52, "Pink", 4, "Pink"), (51, "Light Pink", 4, "Pink"), (53, "Dark Pink", 4, "Pink"),
           (42, "Red", 18, "Red"), (43, "Dark Red", 18, "Red"), (19, "Greenish Khaki", 20, "Khaki green"),
           (62, "Green", 19, "Green"), (63, "Dark Green", 19, "Green"), (61, "Light Green", 19, "Green"),
           (82, "Yellow", 8, "Yellow"), (81, "Light Yellow", 8, "Yellow"), (33, "Orange", 7, "Orange"),
           (23, "Dark Yellow", 8, "Yellow"), (31, "Light Orange", 7, "Orange"),
           (17, "Yellowish Brown", 15, "Yellowish Brown"),
           (16, "Brown", 3, "Brown"), (117, "Dark Brown", 3, "Brown"), (92, "Dark Purple", 13, "Lilac Purple"),
           (91, "Light Purple", 13, "Lilac Purple"), (93, "Purple", 13, "Lilac Purple"),
           (80, "Dark Turquoise", 14, "Turquoise"),
           (3, "Silver", 10, "Metal"), (5, "Gold", 10, "Metal"), (1, "Other", 1, "undefined")]
COLOUR_WEIGHTS = np.array([22, 9, 4, 4, 3, 3, 8, 4, 4, 4, 3, 2, 3, 3, 1, 3, 1, 2, 2, 1, 1, 2, 1, 1, 1, 1, 1, 2, 1, 1,
                           1, 1, 1, 1, 1, 1], dtype=float)
COLOUR_VALUES = [(4, "Dark"), (1, "Dusty Light"), (2, "Light"), (3, "Bright"), (7, "Medium"), (6, "Medium Dusty"),
                 (5, "Undefined")]
GRAPHICS = [(1010016, "Solid", 48), (1010001, "All over pattern", 14), (1010017, "Stripe", 5),
            (1010010, "Melange", 5), (1010008, "Front print", 3), (1010014, "Placement print", 3),
            (1010021, "Lace", 2), (1010023, "Denim", 3), (1010004, "Check", 2), (1010005, "Colour blocking", 1),
            (1010002, "Application/3D", 1), (1010006, "Dot", 1), (1010019, "Sequin", 1), (1010026, "Other pattern", 1)]
SECTION_WORDS = ["Womens Everyday Collection", "Womens Trend", "Womens Casual", "Womens Tailoring", "Womens Lingerie",
                 "Womens Nightwear, Socks & Tigh", "Womens Swimwear, beachwear", "Womens Small accessories",
                 "Womens Big accessories", "Womens Shoes", "Baby Essentials & Complements", "Baby Girl", "Baby Boy",
                 "Kids Girl", "Kids Boy", "Young Girl", "Young Boy", "Girls Underwear & Basics",
                 "Boys Underwear & Basics", "Kids Accessories, Swimwear & D", "Kids & Baby Shoes",
                 "Divided Collection", "Divided Basics", "Divided Projects", "Divided Accessories", "Ladies Denim",
                 "Mens Everyday Basics", "Men Suits & Tailoring", "Contemporary Smart", "Contemporary Casual",
                 "Men Underwear", "Men Accessories", "Men Shoes", "Ladies H&M Sport", "Men H&M Sport",
                 "Kids Sports"]
NAME_WORDS = ["Luna", "Bella", "Tilly", "Alva", "Marco", "Robin", "Skye", "Nova", "Pluto", "Daisy", "Ivy", "Leo",
              "Mira", "Otto", "Wilma", "Felix", "Juno", "Elsa", "Hugo", "Stella", "Atlas", "Pia", "Theo", "Nina"]
DESC_ADJ = ["Fitted", "Oversized", "Relaxed-fit", "Short", "Long", "Soft", "Loose-fit", "Cropped", "Wide", "Slim-fit"]
DESC_MATERIAL = ["cotton jersey", "viscose", "rib-knit fabric", "woven fabric", "denim", "fine-knit cotton",
                 "sweatshirt fabric", "lyocell", "recycled polyester", "linen-blend weave"]
DESC_FEATURES = ["a round neckline", "long sleeves", "short sleeves", "a V-neck", "side pockets",
                 "an elasticated waist", "a concealed zip", "buttons down the front", "narrow shoulder straps",
                 "a high waist", "a wrapover front", "ribbing at the cuffs and hem", "a printed motif",
                 "a gently rounded hem", "a \"distressed\" look", "a so-called \"paperbag\" waist",
                 "wide, 3/4-length sleeves", "a text print, and a hood"]

# --- real statistics (DATA.md) -----------------------------------------------------------------------------
REAL_N_ARTICLES = 105_542
REAL_N_CUSTOMERS = 1_371_980
REAL_N_DAYS = 734  # 2018-09-20 .. 2020-09-22
PRICE_POINTS_SEK = np.array([2.99, 3.99, 4.99, 5.99, 6.99, 7.99, 8.99, 9.99, 11.99, 12.99, 14.99, 16.99, 17.99,
                             19.99, 22.99, 24.99, 27.99, 29.99, 34.99, 39.99, 44.99, 49.99, 59.99, 69.99, 79.99,
                             99.99, 129.99, 149.99, 199.0, 299.0])
SALE_FACTORS = np.array([1.0, 0.9, 0.8, 0.7, 0.6, 0.5])
N_SEGMENTS = 12

# Latent process parameters (tuned against DATA.md with `recsys synth --compare`).
BASKET_EXTRA_MEAN = 1.75        # distinct rows per basket = 1 + NegBin(mean this)
BASKET_DISPERSION = 0.55
DUPLICATE_RATE = 0.075          # extra identical rows per row (9.3 % of rows are duplicates)
P_REPEAT = 0.10                 # row = one of the customer's last two articles
P_HISTORY_DEPT = 0.20           # first row of a basket from the department of the customer's last article
P_BASKET_DEPT = 0.30            # later rows of a basket from the department of the basket's first article
P_GLOBAL = 0.10                 # row from global popularity (trends every segment follows)
POPULARITY_SIGMA = 1.5         # log-normal spread of an article's base popularity
ACTIVITY_SIGMA = 1.25           # log-normal spread of a customer's visit rate
CHANNEL2_SHARE = 0.69
GROUP_TASTE_POWER = 2.0         # sharpens a segment's index-group preference
TYPE_TASTE_SIGMA = 1.2          # log-normal spread of a segment's product-type preferences
COLOUR_TASTE_SIGMA = 0.6        # log-normal spread of a segment's colour preferences
PRICE_SIGMA = 0.38              # log-normal spread of prices around a product group's centre
POPULARITY_CAP_Z = 2.6         # base popularity capped at this many log-sigmas
AFFINITY_CAP = 8.0              # no article is more than this many times a segment's average taste
DECAY_DAYS = 55.0               # median e-folding time of an article's decline after its peak


@dataclass
class Catalogue:
    """Articles in canonical form plus the latent arrays the simulation needs (position = article index)."""

    frame: pd.DataFrame          # canonical: article_id 10-char string, int codes as int
    group: np.ndarray            # index group position 0..4
    product_group: np.ndarray    # position in the list of product group names
    department: np.ndarray       # dense department code
    price_cents: np.ndarray      # full SEK price in cents
    launch: np.ndarray           # launch day (0 = start_date; negative = launched before the data starts)
    rise: np.ndarray             # days to peak
    decay: np.ndarray            # e-folding time of the decline (days)
    base: np.ndarray             # base popularity (heavy tailed)
    season: np.ndarray           # 0 none, 1 summer, 2 winter


@dataclass
class Population:
    """Customers in Kaggle form plus their latent taste and activity."""

    frame: pd.DataFrame
    segment: np.ndarray
    rate: np.ndarray             # visits per day while active
    start: np.ndarray            # first day of the active window
    end: np.ndarray              # last day of the active window
    channel2: np.ndarray         # probability that a visit is online (channel 2)


def _rngs(seed: int) -> dict[str, np.random.Generator]:
    """Independent streams, so that `--articles` changes the catalogue without shifting customers."""
    names = ["catalogue", "life", "segments", "customers", "activity", "transactions"]
    children = np.random.SeedSequence(seed).spawn(len(names))
    return {n: np.random.default_rng(c) for n, c in zip(names, children)}


def _hex_ids(prefix: str, seed: int, n: int) -> np.ndarray:
    """64 lowercase hex characters per id, like Kaggle's hashed ids; stable for (prefix, seed, index)."""
    stem = f"{prefix}:{seed}:".encode()
    return np.array([hashlib.sha256(stem + str(i).encode()).hexdigest() for i in range(n)], dtype=object)


def format_price(cents: int) -> str:
    """Kaggle's price text: SEK / 590 computed in decimal, truncated to 16 places, trailing zeros dropped."""
    value = (Decimal(int(cents)) / Decimal(59000)).quantize(Decimal("1e-16"), rounding=ROUND_DOWN)
    text = format(value.normalize(), "f")
    return text if "." in text else text + ".0"


# --- catalogue ------------------------------------------------------------------------------------------------
def _choice(rng: np.random.Generator, weights, n: int) -> np.ndarray:
    w = np.asarray(weights, dtype=float)
    return rng.choice(len(w), size=n, p=w / w.sum())


def make_articles(n: int, seed: int) -> pd.DataFrame:
    """A generated catalogue of `n` articles in canonical form (25 Kaggle columns, article_id 10 characters)."""
    rng = _rngs(seed)["catalogue"]
    # Products (several colour variants each: real 2.23 articles per product code) in launch order.
    sizes = rng.geometric(0.55, size=n)
    sizes = np.minimum(sizes + (rng.random(n) < 0.35) * rng.integers(1, 4, n), 12)
    n_products = int(np.searchsorted(np.cumsum(sizes), n) + 1)
    sizes = sizes[:n_products]
    sizes[-1] -= sizes.sum() - n
    codes = np.sort(rng.choice(np.arange(108_775, 959_462), size=n_products, replace=False))
    product = np.repeat(np.arange(n_products), sizes)
    variant = np.concatenate([np.sort(rng.choice(np.arange(1, 60), size=s, replace=False)) for s in sizes])

    # Product-level attributes: index group, index, product group and type, graphics.
    p_group = _choice(rng, [g[2] for g in INDEX_GROUPS], n_products)
    p_index = np.empty(n_products, dtype=int)
    for gi in range(len(INDEX_GROUPS)):
        members = [i for i, ix in enumerate(INDEXES) if ix[2] == gi]
        mask = p_group == gi
        p_index[mask] = np.array(members)[_choice(rng, [INDEXES[i][3] for i in members], int(mask.sum()))]
    pg_weights = np.array([pg[1] for pg in PRODUCT_GROUPS])
    p_pg = _choice(rng, pg_weights, n_products)
    p_type = np.array([rng.integers(len(PRODUCT_GROUPS[g][4])) for g in p_pg])
    p_graphic = _choice(rng, [g[2] for g in GRAPHICS], n_products)
    p_name = rng.integers(len(NAME_WORDS), size=n_products)
    p_price = rng.lognormal(0, PRICE_SIGMA, n_products) * np.array([PRODUCT_GROUPS[g][2] for g in p_pg])
    p_price *= np.where(p_group == 1, 0.65, 1.0)  # children's clothes cost less
    p_desc = [_description(rng, PRODUCT_GROUPS[g][4][t][0]) for g, t in zip(p_pg, p_type)]

    colour = _choice(rng, COLOUR_WEIGHTS, n)
    value = rng.integers(len(COLOUR_VALUES), size=n)
    # Sections: a few per index; departments: one per (section, product group).
    section = (p_index * 7 + p_pg % 4 + (rng.random(n_products) < 0.2)) % len(SECTION_WORDS)
    section_no = 2 + section * 3
    dept_key = section * 100 + p_pg
    uniq, dept = np.unique(dept_key, return_inverse=True)
    dept_no = 1000 + (uniq * 37) % 8999
    empty_desc = rng.random(n) < 416 / REAL_N_ARTICLES

    rows = []
    for i in range(n):
        p = product[i]
        g, ix, pg, ty = p_group[p], p_index[p], p_pg[p], p_type[p]
        type_name, type_no = PRODUCT_GROUPS[pg][4][ty]
        garment_no, garment_name = PRODUCT_GROUPS[pg][3]
        c = COLOURS[colour[i]]
        sec = SECTION_WORDS[section[p]]
        name = f"{NAME_WORDS[p_name[p]]} {type_name.split('/')[0].lower()}"
        if variant[i] > 1 and i % 3 == 0:
            name += f" ({variant[i]})"
        rows.append((
            f"{codes[p] * 1000 + variant[i]:010d}", int(codes[p]), name,
            type_no, type_name, PRODUCT_GROUPS[pg][0], GRAPHICS[p_graphic[p]][0], GRAPHICS[p_graphic[p]][1],
            c[0], c[1], COLOUR_VALUES[value[i]][0], COLOUR_VALUES[value[i]][1], c[2], c[3],
            int(dept_no[dept[p]]), f"{type_name.split('/')[0]} {sec.split()[0]}",
            INDEXES[ix][0], INDEXES[ix][1], INDEX_GROUPS[g][0], INDEX_GROUPS[g][1], int(section_no[p]), sec,
            garment_no, garment_name, None if empty_desc[i] else p_desc[p],
        ))
    frame = pd.DataFrame(rows, columns=RAW_COLUMNS[ARTICLES])
    frame.attrs["price_sek"] = p_price[product]
    return frame


def _description(rng: np.random.Generator, type_name: str) -> str:
    features = rng.choice(len(DESC_FEATURES), size=3, replace=False)
    f = [DESC_FEATURES[k] for k in features]
    return (f"{DESC_ADJ[rng.integers(len(DESC_ADJ))]} {type_name.split('/')[0].lower()} in "
            f"{DESC_MATERIAL[rng.integers(len(DESC_MATERIAL))]} with {f[0]}, {f[1]} and {f[2]}.")


def read_articles(path: str) -> pd.DataFrame:
    """A real catalogue (Kaggle articles.csv, or a parquet with the same columns) in canonical form."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"articles file not found: {path}")
    if p.suffix == ".parquet":
        frame = pd.read_parquet(p)
    else:
        frame = pd.read_csv(p, dtype=str, keep_default_na=False, na_values=[""])
    missing = [c for c in RAW_COLUMNS[ARTICLES] if c not in frame.columns]
    if missing:
        raise ValueError(f"{path}: missing article columns {missing} (expected {RAW_COLUMNS[ARTICLES]})")
    frame = frame[RAW_COLUMNS[ARTICLES]].copy()
    frame["article_id"] = frame["article_id"].astype(str).str.strip().str.zfill(10)
    bad = ~frame["article_id"].str.fullmatch(r"\d{10}")
    if bad.any():
        row = int(np.flatnonzero(bad.to_numpy())[0])
        value = frame["article_id"].iloc[row]
        raise ValueError(f"{path}: row {row + 2}: field article_id {value!r} is not an integer id")
    for col in [c for c in RAW_COLUMNS[ARTICLES] if c in ARTICLE_INT_COLUMNS]:
        values = pd.to_numeric(frame[col], errors="coerce")
        if values.isna().any():
            row = int(np.flatnonzero(values.isna().to_numpy())[0])
            raise ValueError(f"{path}: row {row + 2}: field {col} {frame[col].iloc[row]!r} is not an integer")
        frame[col] = values.astype(np.int64)
    if frame["article_id"].duplicated().any():
        dup = frame.loc[frame["article_id"].duplicated(), "article_id"].iloc[0]
        raise ValueError(f"{path}: duplicate article_id {dup}")
    return frame.reset_index(drop=True)


def build_catalogue(frame: pd.DataFrame, seed: int, n_days: int) -> Catalogue:
    """Latent life cycle, popularity and price for each article; launch order follows product_code (as at H&M)."""
    rng = _rngs(seed)["life"]
    n = len(frame)
    groups = [g[1] for g in INDEX_GROUPS]
    group = frame["index_group_name"].map({g: i for i, g in enumerate(groups)}).fillna(0).to_numpy(int)
    pg_names = [pg[0] for pg in PRODUCT_GROUPS]
    product_group = frame["product_group_name"].map({g: i for i, g in enumerate(pg_names)}).fillna(9).to_numpy(int)
    department = pd.factorize(frame["department_no"])[0]

    price_sek = frame.attrs.get("price_sek")
    if price_sek is None:  # a real catalogue has no price: draw one by product group
        centre = np.array([PRODUCT_GROUPS[g][2] for g in product_group])
        price_sek = rng.lognormal(0, PRICE_SIGMA, n) * centre * np.where(group == 1, 0.65, 1.0)
    price_sek = np.asarray(price_sek) * rng.lognormal(0, 0.08, n)
    point = np.clip(np.searchsorted(PRICE_POINTS_SEK, price_sek), 0, len(PRICE_POINTS_SEK) - 1)
    price_cents = np.round(PRICE_POINTS_SEK[point] * 100).astype(np.int64)

    # Launch: product codes grow with time, so rank them onto [-400, n_days - 3] with jitter.
    order = frame["product_code"].rank(method="average").to_numpy() / n
    launch = np.round(-400 + order * (n_days + 397) + rng.normal(0, 25, n)).astype(int)
    launch = np.minimum(launch, n_days - 3)
    rise = rng.integers(3, 22, n).astype(float)
    decay = rng.lognormal(math.log(DECAY_DAYS), 0.6, n)
    evergreen = rng.random(n) < 0.06
    decay[evergreen] = 2000.0
    launch[evergreen] = np.minimum(launch[evergreen], rng.integers(-400, 0, int(evergreen.sum())))
    # heavy tailed, but with a flat head: the real week's top-1 article has 0.35 % of rows, the top-10 2.4 %
    base = np.minimum(rng.lognormal(0, POPULARITY_SIGMA, n), math.exp(POPULARITY_SIGMA * POPULARITY_CAP_Z))
    season = np.where(product_group == pg_names.index("Swimwear"), 1, 0)
    season = np.where(frame["product_type_name"].isin(["Coat", "Jacket", "Boots", "Gloves", "Hat/beanie"]), 2, season)
    return Catalogue(frame, group, product_group, department, price_cents, launch, rise, decay, base, season)


# --- customers ------------------------------------------------------------------------------------------------
SEGMENT_AGES = np.array([21, 23, 25, 27, 30, 34, 38, 43, 48, 52, 57, 62], dtype=float)  # one per segment


def _taste_factors(seed: int, kind: str, names: np.ndarray, sigma: float) -> np.ndarray:
    """(segments, len(names)) log-normal preferences, keyed by the attribute's name (so a real catalogue with
    other product types gets tastes too, and the same name always gets the same taste for a seed)."""
    out = np.empty((N_SEGMENTS, len(names)))
    for j, name in enumerate(names):
        key = int.from_bytes(hashlib.sha256(f"{kind}:{name}".encode()).digest()[:8], "little")
        out[:, j] = np.random.default_rng([seed, key]).normal(0, sigma, N_SEGMENTS)
    return np.exp(out)


def segment_affinity(cat: Catalogue, seed: int) -> np.ndarray:
    """(segments, articles) multiplier on popularity: the planted taste a model should learn.

    Index group preference is shaped by the segment's age (young: Divided, Sport; thirties to forties:
    Baby/Children; all: Ladieswear), product type and colour preferences are segment-specific, and each
    segment has a price level.
    """
    rng = _rngs(seed)["segments"]
    young = np.clip((40 - SEGMENT_AGES) / 20, 0, 1)
    # Index groups: Ladieswear, Baby/Children, Divided, Menswear, Sport
    base_ig = np.stack([np.full(N_SEGMENTS, 3.0), 0.3 + 3.0 * (1 - young) * (SEGMENT_AGES < 50), 0.2 + 4.0 * young,
                        np.full(N_SEGMENTS, 1.0), 0.2 + 0.6 * young], axis=1)
    index_pref = np.stack([rng.dirichlet(b * 2) for b in base_ig])
    price_level = rng.normal(0, 0.35, N_SEGMENTS)
    types, type_of = np.unique(cat.frame["product_type_name"].fillna("").to_numpy(str), return_inverse=True)
    colours, colour_of = np.unique(cat.frame["perceived_colour_master_name"].fillna("").to_numpy(str),
                                   return_inverse=True)
    type_pref = _taste_factors(seed, "type", types, TYPE_TASTE_SIGMA)
    colour_pref = _taste_factors(seed, "colour", colours, COLOUR_TASTE_SIGMA)
    log_price = np.log(cat.price_cents / 100.0)
    price_fit = np.exp(-((log_price[None, :] - np.median(log_price) - price_level[:, None]) ** 2) / (2 * 0.8 ** 2))
    affinity = (index_pref[:, cat.group] ** GROUP_TASTE_POWER * type_pref[:, type_of] * colour_pref[:, colour_of]
                * price_fit)
    affinity /= affinity.mean(axis=1, keepdims=True)
    return np.minimum(affinity, AFFINITY_CAP)


def sample_ages(rng: np.random.Generator, n: int) -> np.ndarray:
    """Bimodal like the real customers: a peak in the early twenties, another around fifty (quartiles 24/31/48)."""
    comp = rng.choice(3, size=n, p=[0.38, 0.22, 0.40])
    age = rng.normal(np.array([23.5, 31.0, 51.0])[comp], np.array([2.8, 5.0, 7.5])[comp])
    return np.clip(np.floor(age), 16, 99)


def make_customers(n: int, seed: int, n_days: int, rows_per_customer: float) -> Population:
    """Customers in Kaggle form (empty-field conventions included) with segment, activity and channel."""
    rngs = _rngs(seed)
    rng = rngs["customers"]
    ids = np.sort(_hex_ids("customer", seed, n))  # customers.csv is sorted by id, and so is each day's block
    age = sample_ages(rng, n)
    age_missing = rng.random(n) < 0.0116
    fn = rng.random(n) < 0.345
    active = np.where(fn, rng.random(n) < 0.97, rng.random(n) < 0.003)
    club = np.array(["ACTIVE", "PRE-CREATE", "LEFT CLUB", ""], dtype=object)[
        _choice(rng, [0.9232, 0.0716, 0.0004, 0.0048], n)]
    subscribed = np.array(["Regularly", "Monthly", "NONE"], dtype=object)[_choice(rng, [0.965, 0.002, 0.033], n)]
    others = np.array(["NONE", "", "Regularly", "None"], dtype=object)[_choice(rng, [0.963, 0.023, 0.013, 0.001], n)]
    news = np.where(fn, subscribed, others)
    n_postal = max(1, n // 3)
    postal_ids = _hex_ids("postal", seed, n_postal)
    postal = postal_ids[np.minimum(rng.zipf(1.6, n) - 1, n_postal - 1)]
    frame = pd.DataFrame({
        "customer_id": ids,
        "FN": np.where(fn, 1.0, np.nan),
        "Active": np.where(active, 1.0, np.nan),
        "club_member_status": club,
        "fashion_news_frequency": news,
        "age": np.where(age_missing, np.nan, age),
        "postal_code": postal,
    })

    logits = -((age[:, None] - SEGMENT_AGES[None, :]) ** 2) / (2 * 5.0 ** 2)
    prob = np.exp(logits - logits.max(axis=1, keepdims=True))
    prob /= prob.sum(axis=1, keepdims=True)
    segment = (prob.cumsum(axis=1) < rng.random(n)[:, None]).sum(axis=1).clip(0, N_SEGMENTS - 1)

    act = rngs["activity"]
    start = np.maximum(0, act.integers(-n_days, n_days, n))
    length = act.exponential(1.6 * n_days, n)
    end = np.minimum(n_days - 1, start + length.astype(int))
    z = act.lognormal(0, ACTIVITY_SIGMA, n)
    rows_per_visit = (1 + BASKET_EXTRA_MEAN) * (1 + DUPLICATE_RATE)
    # rows_per_customer is a two-year figure (the real data spans 734 days); shorter ranges get fewer rows
    target_visits = rows_per_customer * n_days / REAL_N_DAYS / rows_per_visit
    rate = z * target_visits / np.mean(z * (end - start + 1))
    channel2 = act.beta(0.9, 0.9 * (1 - CHANNEL2_SHARE) / CHANNEL2_SHARE, n)
    return Population(frame, segment.astype(np.int16), rate, start, end, channel2)


def customer_segments(synth_cfg: SynthConfig) -> pd.DataFrame:
    """The planted taste segment of each customer (what a model should discover): customer_id, segment, age."""
    n_days = _n_days(synth_cfg)
    pop = make_customers(synth_cfg.n_customers, synth_cfg.seed, n_days, synth_cfg.rows_per_customer)
    return pd.DataFrame({"customer_id": pop.frame["customer_id"], "segment": pop.segment, "age": pop.frame["age"]})


# --- transactions ---------------------------------------------------------------------------------------------
def _n_days(synth_cfg: SynthConfig) -> int:
    start, end = date.fromisoformat(synth_cfg.start_date), date.fromisoformat(synth_cfg.end_date)
    if end < start:
        raise ValueError(f"synth.end_date {end} is before synth.start_date {start}")
    return (end - start).days + 1


def _day_weights(start: date, n_days: int) -> np.ndarray:
    """Store traffic per day: weekday pattern, summer and winter peaks, Black Friday and pre-Christmas rushes."""
    days = [start + timedelta(d) for d in range(n_days)]
    weekday = np.array([1.0, 1.0, 0.88, 1.2, 1.15, 1.08, 0.95])[[d.weekday() for d in days]]
    doy = np.array([d.timetuple().tm_yday for d in days])
    # a summer peak and a quiet late September (the real last week sells ~0.79 of the two-year daily mean)
    yearly = 1 + 0.25 * np.cos(2 * np.pi * (doy - 172) / 365) + 0.12 * np.cos(4 * np.pi * (doy - 172) / 365)
    special = np.ones(n_days)
    for i, d in enumerate(days):
        if d.month == 11 and 23 <= d.day <= 29 and d.weekday() == 4:
            special[i] = 2.2
        elif d.month == 12 and 10 <= d.day <= 22:
            special[i] = 1.3
    trend = np.linspace(1.05, 0.92, n_days)
    return weekday * yearly * special * trend


def _season_factor(season: np.ndarray, day: date) -> np.ndarray:
    doy = day.timetuple().tm_yday
    summer = 1 + 0.9 * math.cos(2 * math.pi * (doy - 180) / 365)
    winter = 1 + 0.7 * math.cos(2 * math.pi * (doy - 330) / 365)
    return np.choose(season, [1.0, summer, winter])


class _Simulator:
    """State of the day-by-day simulation: article weights, per-segment samplers, customers' last articles."""

    def __init__(self, cat: Catalogue, pop: Population, seed: int, start: date, n_days: int):
        self.cat, self.pop, self.start, self.n_days = cat, pop, start, n_days
        self.rng = _rngs(seed)["transactions"]
        self.affinity = segment_affinity(cat, seed)
        self.dept_order = np.argsort(cat.department, kind="stable")
        counts = np.bincount(cat.department)
        self.dept_end = np.cumsum(counts)
        self.dept_start = self.dept_end - counts
        self.last1 = np.full(len(pop.segment), -1, dtype=np.int64)
        self.last2 = np.full(len(pop.segment), -1, dtype=np.int64)
        self.visits = self._draw_visits()

    def _draw_visits(self) -> np.ndarray:
        """All (day, customer) visits at once: counts per customer, days weighted by store traffic."""
        pop, rng = self.pop, self.rng
        target = _day_weights(self.start, self.n_days)
        counts = rng.poisson(pop.rate * (pop.end - pop.start + 1))
        # almost every customer in customers.csv bought at least once in the two years (99.3 % in the real data)
        at_least_once = 0.99 * min(1.0, self.n_days / REAL_N_DAYS)
        counts = np.where((counts == 0) & (rng.random(len(counts)) < at_least_once), 1, counts)
        # Customers join and leave, so the active population is not flat; reweight days so that the expected
        # rows per day follow the store-traffic profile anyway (two fixed-point steps are plenty).
        weights = target.copy()
        for _ in range(3):
            cum = np.concatenate([[0.0], np.cumsum(weights)])
            span = cum[pop.end + 1] - cum[pop.start]
            load = np.zeros(self.n_days + 1)
            np.add.at(load, pop.start, counts / span)
            np.add.at(load, pop.end + 1, -counts / span)
            expected = weights * np.cumsum(load)[:-1]
            covered = expected > 0  # days on which some customer is active
            if not covered.any():
                break
            ratio = np.ones(self.n_days)
            ratio[covered] = (target[covered] / target[covered].mean()) / (expected[covered] / expected[covered].mean())
            weights = weights * ratio
        cum = np.concatenate([[0.0], np.cumsum(weights)])
        span = cum[pop.end + 1] - cum[pop.start]
        cust = np.repeat(np.arange(len(counts)), counts)
        u = cum[pop.start[cust]] + rng.random(len(cust)) * span[cust]
        day = np.clip(np.searchsorted(cum, u, side="right") - 1, 0, self.n_days - 1)
        key = np.unique(day.astype(np.int64) * len(counts) + cust)  # one visit per customer and day, sorted by day
        return key

    def _weights(self, d: int) -> np.ndarray:
        cat = self.cat
        age = d - cat.launch
        life = np.where(age < 0, 0.0, np.where(age < cat.rise, (age + 1) / cat.rise,
                                                np.exp(-np.maximum(age - cat.rise, 0) / cat.decay)))
        return cat.base * life * _season_factor(cat.season, self.start + timedelta(d))

    def day(self, d: int):
        """Rows for day `d`: (customer index, article index, price cents, channel) arrays, basket by basket."""
        rng, pop, cat = self.rng, self.pop, self.cat
        n_c = len(pop.segment)
        lo, hi = np.searchsorted(self.visits, [d * n_c, (d + 1) * n_c])
        cust = (self.visits[lo:hi] - d * n_c).astype(np.int64)
        if len(cust) == 0:
            return None
        pop_w = self._weights(d)
        seg_search = _row_sampler(np.cumsum(self.affinity * pop_w[None, :], axis=1))
        glob_cum = np.cumsum(pop_w)
        dept_cum = np.cumsum(pop_w[self.dept_order])

        p = BASKET_DISPERSION / (BASKET_DISPERSION + BASKET_EXTRA_MEAN)
        size = 1 + rng.negative_binomial(BASKET_DISPERSION, p, len(cust))
        row_cust = np.repeat(cust, size)
        first = np.zeros(len(row_cust), dtype=bool)
        first[np.concatenate([[0], np.cumsum(size)[:-1]])] = True
        basket = np.repeat(np.arange(len(cust)), size)
        art = np.full(len(row_cust), -1, dtype=np.int64)

        def sample_segment(rows):
            seg = pop.segment[row_cust[rows]]
            use_global = rng.random(len(rows)) < P_GLOBAL
            out = np.empty(len(rows), dtype=np.int64)
            g = np.flatnonzero(use_global)
            out[g] = np.searchsorted(glob_cum, rng.random(len(g)) * glob_cum[-1], side="right")
            s = np.flatnonzero(~use_global)
            out[s] = seg_search(seg[s], rng.random(len(s)))
            return np.minimum(out, len(pop_w) - 1)

        def sample_department(rows, of_article):
            dept = cat.department[of_article]
            a, b = self.dept_start[dept], self.dept_end[dept]
            low = np.where(a > 0, dept_cum[np.maximum(a - 1, 0)], 0.0)
            high = dept_cum[b - 1]
            ok = high > low
            pos = np.searchsorted(dept_cum, low + rng.random(len(rows)) * (high - low), side="right")
            pos = np.clip(pos, a, b - 1)
            return np.where(ok, self.dept_order[pos], -1)

        u = rng.random(len(row_cust))
        l1, l2 = self.last1[row_cust], self.last2[row_cust]
        repeat = (u < P_REPEAT) & (l1 >= 0)
        pick2 = (rng.random(len(row_cust)) < 0.4) & (l2 >= 0)
        art[repeat] = np.where(pick2, l2, l1)[repeat]
        hist = first & ~repeat & (l1 >= 0) & (u < P_REPEAT + P_HISTORY_DEPT)
        idx = np.flatnonzero(hist)
        art[idx] = sample_department(idx, l1[idx])
        idx = np.flatnonzero(first & (art < 0))
        art[idx] = sample_segment(idx)
        first_art = art[first][basket]
        later = ~first & (art < 0)
        dept_rows = np.flatnonzero(later & (rng.random(len(art)) < P_BASKET_DEPT))
        art[dept_rows] = sample_department(dept_rows, first_art[dept_rows])
        idx = np.flatnonzero(art < 0)
        art[idx] = sample_segment(idx)

        # remember each customer's last two articles (one visit per customer per day)
        ends = np.cumsum(size) - 1
        self.last2[cust] = np.where(size > 1, art[ends - 1], self.last1[cust])
        self.last1[cust] = art[ends]

        # price: full, or on sale once the article is past its peak
        age = d - cat.launch[art]
        on_sale = rng.random(len(art)) < np.clip((age - cat.rise[art] - 30) / 400, 0, 0.45)
        factor = np.where(on_sale, rng.integers(1, len(SALE_FACTORS), len(art)), 0)
        visit_channel = np.where(rng.random(len(cust)) < pop.channel2[cust], 2, 1).astype(np.int8)
        channel = np.repeat(visit_channel, size)
        # several units of one article: exact duplicate rows (same price, same channel)
        copies = 1 + (rng.random(len(art)) < DUPLICATE_RATE / 1.35) * rng.geometric(0.75, len(art))
        return tuple(np.repeat(x, copies) for x in (row_cust, art, factor, channel))


def _row_sampler(cum: np.ndarray):
    """Sampling from one of several distributions (rows of cumulative sums) with a single searchsorted."""
    n = cum.shape[1]
    totals = cum[:, -1]
    offsets = np.concatenate([[0.0], np.cumsum(totals)[:-1]])
    flat = (cum + offsets[:, None]).ravel()

    def sample(rows: np.ndarray, uniform: np.ndarray) -> np.ndarray:
        pos = np.searchsorted(flat, offsets[rows] + uniform * totals[rows], side="right")
        return np.clip(pos - rows.astype(np.int64) * n, 0, n - 1)

    return sample


# --- writing --------------------------------------------------------------------------------------------------
def _fixed(strings, width: int) -> np.ndarray:
    """Byte strings as a (n, width) uint8 matrix, zero-padded (zeros are dropped when the line is assembled)."""
    arr = np.asarray(strings, dtype=f"S{width}")
    return arr.view(np.uint8).reshape(len(arr), width)


def _assemble(parts: list[np.ndarray]) -> bytes:
    matrix = np.hstack(parts)
    return matrix[matrix != 0].tobytes()


def _price_table(price_cents: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every (article, sale factor) price, as text once (with its trailing comma) and as a float."""
    cents = np.round(price_cents[:, None] * SALE_FACTORS[None, :]).astype(np.int64).ravel()
    uniq, inverse = np.unique(cents, return_inverse=True)
    texts = np.array([(format_price(c) + ",").encode() for c in uniq], dtype="S20")
    return texts[inverse].reshape(len(price_cents), len(SALE_FACTORS)), cents


def write_articles(frame: pd.DataFrame, path: Path) -> None:
    """Kaggle articles.csv: integer ids without the leading zero, detail_desc quoted when it must be."""
    out = frame.copy()
    out["article_id"] = out["article_id"].astype(np.int64)
    out.to_csv(path, index=False, quoting=csv.QUOTE_MINIMAL, lineterminator="\n")


def write_customers(frame: pd.DataFrame, path: Path) -> None:
    """Kaggle customers.csv: FN/Active '1.0' or empty, age like '49.0' or empty."""
    frame.to_csv(path, index=False, lineterminator="\n", na_rep="")


def generate(synth_cfg: SynthConfig, out_dir: str, drop_days: int = 0, landing_dir: str | None = None) -> dict:
    """Write articles.csv, customers.csv and transactions_train.csv to `out_dir`; deterministic for the seed.

    `drop_days` > 0: the simulation runs that many days past `end_date`, and each of those days is written as a
    daily drop `<landing_dir>/transactions/YYYY-MM-DD.csv` (the nightly's input; `landing_dir` defaults to
    `landing` beside `out_dir`). Same customers, catalogue and article life cycles as the main file, so a drop
    continues it. The whole simulation depends on its length, so the main file and the drops differ with N (each
    is deterministic for the seed and N)."""
    t0 = time.perf_counter()
    if synth_cfg.n_customers < 1 or (synth_cfg.n_articles < 1 and not synth_cfg.articles_path):
        raise ValueError(f"synth: n_customers ({synth_cfg.n_customers}) and n_articles "
                         f"({synth_cfg.n_articles}) must be >= 1")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if drop_days < 0:
        raise ValueError(f"synth: drop_days must be >= 0, got {drop_days}")
    start = date.fromisoformat(synth_cfg.start_date)
    n_days = _n_days(synth_cfg)
    total_days = n_days + drop_days
    seed = synth_cfg.seed

    if synth_cfg.articles_path:
        frame = read_articles(synth_cfg.articles_path)
    else:
        frame = make_articles(synth_cfg.n_articles, seed)
    cat = build_catalogue(frame, seed, total_days)
    pop = make_customers(synth_cfg.n_customers, seed, total_days, synth_cfg.rows_per_customer)
    paths = {name: out / RAW_FILES[name] for name in (ARTICLES, CUSTOMERS, TRANSACTIONS)}
    write_articles(cat.frame, paths[ARTICLES])
    write_customers(pop.frame, paths[CUSTOMERS])
    t_static = time.perf_counter()

    sim = _Simulator(cat, pop, seed, start, total_days)
    price_text, _ = _price_table(cat.price_cents)
    cust_text = _fixed([(c + ",").encode() for c in pop.frame["customer_id"]], 65)
    art_text = _fixed([(str(int(a)) + ",").encode() for a in cat.frame["article_id"]], 11)
    channel_text = _fixed([b"", b"1\n", b"2\n"], 2)
    header = (",".join(RAW_COLUMNS[TRANSACTIONS]) + "\n").encode()

    def day_lines(d: int) -> tuple[bytes, int]:
        """Day `d`'s transactions as CSV lines, and how many."""
        result = sim.day(d)
        if result is None:
            return b"", 0
        row_cust, art, factor, channel = result
        day_text = _fixed([f"{start + timedelta(d)},".encode()], 11)
        return _assemble([
            np.repeat(day_text, len(art), axis=0), cust_text[row_cust], art_text[art],
            price_text[art, factor].view(np.uint8).reshape(len(art), 20), channel_text[channel],
        ]), len(art)

    n_rows = 0
    tmp = paths[TRANSACTIONS].with_suffix(".csv.tmp")
    with open(tmp, "wb") as fh:
        fh.write(header)
        pending: list[bytes] = []
        for d in range(n_days):
            lines, rows = day_lines(d)
            pending.append(lines)
            n_rows += rows
            if d % 7 == 6 or d == n_days - 1:
                fh.write(b"".join(pending))
                pending = []
    tmp.replace(paths[TRANSACTIONS])
    drops = {}
    if drop_days:
        folder = Path(landing_dir or landing_beside(out_dir))
        for d in range(n_days, total_days):
            lines, rows = day_lines(d)
            path = folder / drop_file(start + timedelta(d))
            path.parent.mkdir(parents=True, exist_ok=True)
            part = path.with_suffix(".csv.tmp")  # renamed when complete: a file trigger never sees half a drop
            part.write_bytes(header + lines)
            part.replace(path)
            drops[str(path)] = rows
    seconds = time.perf_counter() - t0
    return {
        "out_dir": str(out),
        "paths": {k: str(v) for k, v in paths.items()},
        "rows": {ARTICLES: len(cat.frame), CUSTOMERS: len(pop.frame), TRANSACTIONS: n_rows},
        "drops": drops,
        "seed": seed,
        "start_date": synth_cfg.start_date,
        "end_date": synth_cfg.end_date,
        "seconds": round(seconds, 2),
        "seconds_catalogue_and_customers": round(t_static - t0, 2),
        "rows_per_second": round(n_rows / max(seconds, 1e-9)),
    }
