"""Build npgpt/assets/en_ms_cldr.tsv: English -> Malay phrase pairs from the Unicode CLDR locale data.

Run:  pip install babel==2.18.0 && python scripts/make_en_ms_corpus.py

Every pair is one value (a date, a time, an amount, a country...) formatted twice by Babel, once with
the English ('en') and once with the Malay ('ms') CLDR data, so both sides are CLDR's own wording; no
sentence is written by hand. Babel is needed only here, to build the file: npgpt never imports it.

What the pairs cover (counts are printed at the end):
  dates        full / long / medium / short formats, month-year, weekday-day-month, date ranges, quarters
  times        12-hour with and without seconds, with day periods ("in the afternoon"), with a weekday,
               date and time together
  durations    "3 hours", "in 3 hours", "3 hours ago", short forms
  units        numbers with units of length, mass, volume, speed, temperature, data... (long and short)
  currencies   amounts with currency names ("12.50 euros") and symbols ("$12.50")
  names        countries and languages alone, language (country) pairs, lists of countries and of
               languages ("France, Germany, and Japan" -> "Perancis, Jerman dan Jepun")

Reproducible: values are drawn from random.Random(SEED) in a fixed order, and the output is the same
byte for byte for the same Babel version (the CLDR data ships inside Babel; tests/test_seq2seq_data.py
regenerates the file when that version is installed). Spaces: CLDR uses narrow and no-break spaces
(U+202F, U+00A0, U+2009) inside times and ranges; they become plain spaces, so typed text matches.
Each English phrase appears once: a phrase that two formats would give different Malay for is dropped.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import random
from pathlib import Path

SEED = 17
BABEL_VERSION = "2.18.0"  # the version the shipped file was made with
OUT = Path(__file__).resolve().parents[1] / "npgpt" / "assets" / "en_ms_cldr.tsv"

UNITS = [
    "length-kilometer", "length-meter", "length-centimeter", "length-millimeter", "length-mile", "length-foot",
    "length-inch", "length-yard", "length-nautical-mile", "length-light-year",
    "mass-tonne", "mass-kilogram", "mass-gram", "mass-milligram", "mass-pound", "mass-ounce", "mass-carat",
    "volume-liter", "volume-milliliter", "volume-cubic-meter", "volume-gallon", "volume-cup", "volume-tablespoon",
    "volume-teaspoon", "volume-barrel",
    "area-square-kilometer", "area-square-meter", "area-hectare", "area-acre", "area-square-foot",
    "speed-kilometer-per-hour", "speed-meter-per-second", "speed-mile-per-hour", "speed-knot",
    "temperature-celsius", "temperature-fahrenheit", "temperature-kelvin",
    "digital-gigabyte", "digital-megabyte", "digital-kilobyte", "digital-terabyte", "digital-megabit",
    "duration-hour", "duration-minute", "duration-second", "duration-day", "duration-week", "duration-month",
    "duration-year", "duration-century", "duration-millisecond",
    "energy-kilocalorie", "energy-kilowatt-hour", "energy-joule",
    "power-watt", "power-kilowatt", "power-horsepower",
    "pressure-hectopascal", "pressure-bar", "pressure-atmosphere",
    "frequency-megahertz", "frequency-gigahertz", "electric-volt", "electric-ampere",
    "consumption-liter-per-100-kilometer", "angle-degree", "concentr-percent",
]  # fmt: skip

SPACES = {"\u202f": " ", "\u00a0": " ", "\u2009": " ", "\u2007": " "}


def clean(text: str) -> str:
    for k, v in SPACES.items():
        text = text.replace(k, v)
    return " ".join(text.split())


class Pairs:
    """English -> Malay pairs in the order added; a second, different Malay for one English phrase drops both."""

    def __init__(self):
        self.pairs: dict[str, str] = {}
        self.conflicts: set[str] = set()
        self.counts: dict[str, int] = {}

    def add(self, category: str, en: str, ms: str) -> None:
        en, ms = clean(en), clean(ms)
        if not en or not ms or "\t" in en + ms or en in self.conflicts:
            return
        if en in self.pairs:
            if self.pairs[en] != ms:
                del self.pairs[en]
                self.conflicts.add(en)
            return
        self.pairs[en] = ms
        self.counts[category] = self.counts.get(category, 0) + 1


def random_date(rng: random.Random) -> dt.date:
    start = dt.date(1950, 1, 1).toordinal()
    return dt.date.fromordinal(rng.randrange(start, dt.date(2050, 1, 1).toordinal()))


def random_amount(rng: random.Random) -> float | int:
    kind = rng.random()
    if kind < 0.4:
        return rng.randint(1, 99)
    if kind < 0.6:
        return rng.randint(100, 99999)
    if kind < 0.85:
        return round(rng.randint(1, 9999) + rng.randint(1, 99) / 100, 2)
    return round(rng.randint(0, 99) + rng.randint(1, 9) / 10, 1)


def build(seed: int = SEED) -> Pairs:
    from babel import Locale, dates, lists, numbers, units

    rng = random.Random(seed)
    en, ms = Locale("en"), Locale("ms")
    out = Pairs()

    # --- dates --------------------------------------------------------------------------------------
    for fmt, n in (("full", 3000), ("long", 2000), ("medium", 2000), ("short", 2000)):
        for _ in range(n):
            d = random_date(rng)
            out.add("dates", dates.format_date(d, fmt, locale=en), dates.format_date(d, fmt, locale=ms))
    for skeleton, n in (("yMMMM", 800), ("MMMEd", 1500), ("MMMMd", 366), ("yMMMEd", 2000), ("yQQQQ", 300)):
        for _ in range(n):
            d = random_date(rng)
            out.add("dates", dates.format_skeleton(skeleton, d, locale=en), dates.format_skeleton(skeleton, d, locale=ms))
    for _ in range(1500):  # ranges within one month: "Mar 3 – 7, 2025" -> "3–7 Mac 2025"
        d = random_date(rng).replace(day=rng.randint(1, 20))
        e = d + dt.timedelta(days=rng.randint(1, 8))
        if e.month == d.month:
            out.add("dates", dates.format_interval(d, e, "yMMMd", locale=en), dates.format_interval(d, e, "yMMMd", locale=ms))

    # --- times --------------------------------------------------------------------------------------
    def random_time():
        return dt.time(rng.randrange(24), rng.randrange(60), rng.randrange(60))

    for fmt, n in (("short", 1200), ("medium", 1500)):
        for _ in range(n):
            t = random_time()
            out.add("times", dates.format_time(t, fmt, locale=en), dates.format_time(t, fmt, locale=ms))
    for skeleton, n in (("Bhm", 1500), ("Ehm", 1500), ("Hm", 200)):
        for _ in range(n):
            when = dt.datetime.combine(random_date(rng), random_time())
            out.add("times", dates.format_skeleton(skeleton, when, locale=en), dates.format_skeleton(skeleton, when, locale=ms))
    for _ in range(1500):
        when = dt.datetime.combine(random_date(rng), random_time())
        out.add("times", dates.format_datetime(when, "medium", locale=en), dates.format_datetime(when, "medium", locale=ms))

    # --- durations: every count of every unit that Babel keeps in that unit ----------------------------
    spans = {"second": 1, "minute": 60, "hour": 3600, "day": 86400, "week": 7 * 86400, "month": 30 * 86400, "year": 365 * 86400}
    for unit, seconds in spans.items():
        for count in range(1, 100):
            delta = dt.timedelta(seconds=count * seconds)
            for kw in ({"format": "long"}, {"format": "short"}, {"add_direction": True}):
                for sign in ((1, -1) if "add_direction" in kw else (1,)):
                    e = dates.format_timedelta(sign * delta, locale=en, **kw)
                    m = dates.format_timedelta(sign * delta, locale=ms, **kw)
                    if str(count) in e.split():  # Babel did not round it into a larger unit
                        out.add("durations", e, m)

    # --- numbers with units ---------------------------------------------------------------------------
    for _ in range(9000):
        unit, value = rng.choice(UNITS), random_amount(rng)
        length = rng.choice(("long", "long", "short"))
        e, m = units.format_unit(value, unit, length, locale=en), units.format_unit(value, unit, length, locale=ms)
        if unit not in e and unit not in m:  # Babel writes the unit's id when a locale has no name for it
            out.add("units", e, m)

    # --- currencies -----------------------------------------------------------------------------------
    codes = sorted(c for c in en.currencies if c in ms.currencies and not c.startswith("X"))  # X..: gold, test codes
    for _ in range(4500):
        code, value = rng.choice(codes), random_amount(rng)
        out.add("currencies", numbers.format_currency(value, code, locale=en, format_type="name"),
                numbers.format_currency(value, code, locale=ms, format_type="name"))  # fmt: skip
    popular = ["USD", "EUR", "GBP", "JPY", "CNY", "MYR", "SGD", "IDR", "THB", "AUD", "INR", "KRW", "CHF", "HKD", "BND", "PHP"]
    for _ in range(1500):
        code, value = rng.choice(popular), random_amount(rng)
        out.add("currencies", numbers.format_currency(value, code, locale=en), numbers.format_currency(value, code, locale=ms))

    # --- countries and languages ----------------------------------------------------------------------
    countries = sorted(c for c in en.territories if c.isalpha() and c in ms.territories)
    languages = sorted(c for c in en.languages if c in ms.languages and "_" not in c)
    for c in countries:
        out.add("countries", en.territories[c], ms.territories[c])
    for c in languages:
        out.add("languages", en.languages[c], ms.languages[c])
    from babel.localedata import locale_identifiers

    for ident in sorted(locale_identifiers()):
        loc = Locale.parse(ident)
        if loc.territory and not loc.script and not loc.variant and loc.language in languages:
            e, m = loc.get_display_name(en), loc.get_display_name(ms)
            if e and m:
                out.add("languages", e, m)
    for style, n in (("standard", 2500), ("or", 1000)):
        for _ in range(n):
            pick = rng.sample(countries, rng.choice((2, 2, 3)))
            out.add("countries", lists.format_list([en.territories[c] for c in pick], style, locale=en),
                    lists.format_list([ms.territories[c] for c in pick], style, locale=ms))  # fmt: skip
    common_languages = [c for c in languages if len(c) == 2]  # the ISO 639-1 ones, the best known
    for _ in range(1500):
        pick = rng.sample(common_languages, rng.choice((2, 2, 3)))
        out.add("languages", lists.format_list([en.languages[c] for c in pick], locale=en),
                lists.format_list([ms.languages[c] for c in pick], locale=ms))  # fmt: skip
    return out


def render(pairs: Pairs) -> bytes:
    return "".join(f"{e}\t{m}\n" for e, m in pairs.pairs.items()).encode("utf-8")


def main() -> None:
    import babel

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    if babel.__version__ != BABEL_VERSION:
        print(f"note: Babel {babel.__version__} (the shipped file was made with {BABEL_VERSION}); the output may differ")
    pairs = build()
    data = render(pairs)
    args.out.write_bytes(data)
    print(f"{args.out}: {len(pairs.pairs):,} pairs, {len(data):,} bytes, sha256 {hashlib.sha256(data).hexdigest()}")
    print("  " + ", ".join(f"{k} {v:,}" for k, v in pairs.counts.items()) + f"; {len(pairs.conflicts)} ambiguous phrases dropped")


if __name__ == "__main__":
    main()
