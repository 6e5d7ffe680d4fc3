"""Date normalisation: an embedded seq2seq task that needs no download.

The source is a calendar date written in one of many human styles
("Tuesday, 3 March 1998", "March 3rd, '98", "3.3.1998", "3/3/98", ...) and
the target is the same date in ISO 8601, ``YYYY-MM-DD``.  Dates range over
1950-01-01 .. 2049-12-31.

The mapping is a *function*: every source string determines exactly one
date, so exact-match accuracy can in principle reach 100%.  Rules that make
this so:

* two-digit years are read as 50-99 -> 19xx and 00-49 -> 20xx, which covers
  the date range without overlap;
* every numeric style has one fixed field order, told apart by its
  separator and field widths: ``Y/M/D`` with a four-digit year first,
  ``D.M.YYYY`` with dots (European), ``M/D/YY`` with slashes and a two-digit
  year last (US), ``YYYYMMDD`` compact;
* case variants (title / lower / upper) only change letter case, and the
  lower-cased strings of all styles are pairwise distinct over the whole
  date range (checked exhaustively by the tests);
* weekdays, where written, are the true weekday of the date.

Held-out split
--------------
The test split is disjoint from the training split in *dates*, not only in
strings: a date belongs to the test set iff a BLAKE2b hash of its proleptic
Gregorian ordinal falls into a fixed bucket holding ~10% of the hash range.
The assignment therefore depends on neither the seed nor Python's salted
``hash()``, and a model cannot pass the test split by memorising a date it
saw in another style during training.  A run that asks for a validation
split (``num_validation > 0``) gets the dates of a second bucket (~5%),
which then leave the training split, so that choices made while training
look at neither the test dates nor the training dates.  Within a split, examples are drawn
uniformly over that split's dates, the styles and each style's case
variants, from ``np.random.default_rng([seed, split_id])``, so the data are
a deterministic function of ``(seed, split, num_examples)``.
"""

from __future__ import annotations

import datetime
import functools
import hashlib

import numpy as np

MIN_DATE = datetime.date(1950, 1, 1)
MAX_DATE = datetime.date(2049, 12, 31)

# Longest source string any style can produce, e.g.
# "Wednesday, September 30, 1998" (checked exhaustively by the tests).
MAX_SOURCE_LENGTH = 29
# len("YYYY-MM-DD")
TARGET_LENGTH = 10

# A date is held out for test iff its hash bucket is < TEST_BUCKETS out of NUM_BUCKETS, and for
# validation (when a run has one) iff it is in the next VALIDATION_BUCKETS.
NUM_BUCKETS = 1000
TEST_BUCKETS = 100
VALIDATION_BUCKETS = 50

SPLITS = ("train", "validation", "test")
_SPLIT_IDS = {"train": 0, "test": 1, "validation": 2}

# Own name tables rather than strftime("%B"), which depends on the locale.
_MONTHS = (
  "January",
  "February",
  "March",
  "April",
  "May",
  "June",
  "July",
  "August",
  "September",
  "October",
  "November",
  "December",
)
_WEEKDAYS = (
  "Monday",
  "Tuesday",
  "Wednesday",
  "Thursday",
  "Friday",
  "Saturday",
  "Sunday",
)

# Case variants are applied to the whole string; "title" means the string as
# built (capitalised names), so e.g. "3rd" never becomes "3Rd".
_ALL_CASES = ("title", "lower", "upper")
_NO_CASES = ("title",)


def _ordinal(day: int) -> str:
  if 11 <= day % 100 <= 13:
    suffix = "th"
  else:
    suffix = {1: "st", 2: "nd", 3: "rd"}.get(day % 10, "th")
  return f"{day}{suffix}"


def _fields(d: datetime.date) -> dict[str, int | str]:
  """The named fields of `d` that the `_TEMPLATES` are written in."""
  return {
    "day": d.day,
    "ordinal": _ordinal(d.day),
    "m": d.month,
    "month": _MONTHS[d.month - 1],
    "mon": _MONTHS[d.month - 1][:3],
    "weekday": _WEEKDAYS[d.weekday()],
    "wkd": _WEEKDAYS[d.weekday()][:3],
    "year": d.year,
    "yy": f"{d.year % 100:02d}",
  }


# Style name -> str.format template over `_fields`, giving the title-case string.
_TEMPLATES: dict[str, str] = {
  "weekday_day_month_year": "{weekday}, {day} {month} {year}",  # "Tuesday, 3 March 1998"
  "weekday_month_day_year": "{weekday}, {month} {day}, {year}",  # "Tuesday, March 3, 1998"
  "day_month_year": "{day} {month} {year}",  # "3 March 1998"
  "month_day_year": "{month} {day}, {year}",  # "March 3, 1998"
  "month_ordinal_short_year": "{month} {ordinal}, '{yy}",  # "March 3rd, '98"
  "ordinal_of_month_year": "{ordinal} of {month} {year}",  # "3rd of March 1998"
  "month_the_ordinal_year": "{month} the {ordinal}, {year}",  # "March the 3rd, 1998"
  "mon_day_year": "{mon} {day} {year}",  # "Mar 3 1998"
  "day_mon_short_year": "{day} {mon} {yy}",  # "3 MAR 98"
  "wkd_day_mon_year": "{wkd} {day} {mon} {year}",  # "tue 3 mar 1998"
  "wkd_mon_day_year": "{wkd}, {mon} {day}, {year}",  # "Tue, Mar 3, 1998"
  "dd_mon_yyyy_dashes": "{day:02d}-{mon}-{year}",  # "03-Mar-1998"
  # "1998/03/03": year first, always four digits.
  "ymd_slashes": "{year}/{m:02d}/{day:02d}",
  # "3.3.1998": European day.month.year; dots always mean this order.
  "dmy_dots": "{day}.{m}.{year}",
  # "3/3/98": US month/day/yy; a short year last always means this order.
  "mdy_slashes_short_year": "{m}/{day}/{yy}",
  "compact": "{year}{m:02d}{day:02d}",  # "19980303"
}

# The case variants a style may be written in, the canonical one (used when no rng is
# given) first. Styles not listed here take _ALL_CASES.
_CASES: dict[str, tuple[str, ...]] = {
  "day_mon_short_year": ("upper", "title", "lower"),
  "wkd_day_mon_year": ("lower", "title", "upper"),
  # Digits and separators only: no letters whose case could vary.
  "ymd_slashes": _NO_CASES,
  "dmy_dots": _NO_CASES,
  "mdy_slashes_short_year": _NO_CASES,
  "compact": _NO_CASES,
}

DATE_FORMATS: tuple[str, ...] = tuple(_TEMPLATES)


def _check_style(style: str) -> None:
  if style not in _TEMPLATES:
    raise ValueError(f"unknown date style {style!r}; valid styles are: " + ", ".join(DATE_FORMATS))


def _check_date(date: datetime.date) -> None:
  # datetime.datetime is a date subclass; its time part would be dropped
  # silently, so insist on a plain date.
  if not isinstance(date, datetime.date) or isinstance(date, datetime.datetime):
    raise ValueError(f"expected a datetime.date, got {date!r}")
  if not MIN_DATE <= date <= MAX_DATE:
    raise ValueError(
      f"date {date.isoformat()} outside the supported range "
      f"{MIN_DATE.isoformat()} .. {MAX_DATE.isoformat()} (two-digit "
      "years would be ambiguous outside it)"
    )


def _write(date: datetime.date, style: str, case: str) -> str:
  """``date`` in ``style`` and letter ``case``; the arguments are not checked."""
  text = _TEMPLATES[style].format(**_fields(date))
  if case == "lower":
    return text.lower()
  if case == "upper":
    return text.upper()
  return text


def style_cases(style: str) -> tuple[str, ...]:
  """Case variants ("title", "lower", "upper") a style may be written in."""
  _check_style(style)
  return _CASES.get(style, _ALL_CASES)


def format_date(date: datetime.date, style: str, rng: np.random.Generator | None = None) -> str:
  """Writes ``date`` in ``style``.

  Without ``rng`` the style's canonical letter case is used; with one, a
  case variant is drawn uniformly among those the style allows.
  """
  cases = style_cases(style)
  _check_date(date)
  case = cases[0] if rng is None else cases[int(rng.integers(len(cases)))]
  return _write(date, style, case)


def target_for(date: datetime.date) -> str:
  """The ISO 8601 target string, ``YYYY-MM-DD``."""
  _check_date(date)
  return date.isoformat()


def date_bucket(date: datetime.date) -> int:
  """Seed-independent hash bucket in [0, NUM_BUCKETS) of a date."""
  digest = hashlib.blake2b(str(date.toordinal()).encode("ascii"), digest_size=8).digest()
  return int.from_bytes(digest, "little") % NUM_BUCKETS


def is_test_date(date: datetime.date) -> bool:
  """Whether ``date`` is held out for the test split."""
  return date_bucket(date) < TEST_BUCKETS


def date_split(date: datetime.date, *, with_validation: bool) -> str:
  """The split ``date`` belongs to; without a validation split its dates are training dates."""
  bucket = date_bucket(date)
  if bucket < TEST_BUCKETS:
    return "test"
  if with_validation and bucket < TEST_BUCKETS + VALIDATION_BUCKETS:
    return "validation"
  return "train"


@functools.cache
def _split_ordinals(split: str, with_validation: bool) -> np.ndarray:
  first, last = MIN_DATE.toordinal(), MAX_DATE.toordinal()
  return np.array(
    [
      o
      for o in range(first, last + 1)
      if date_split(datetime.date.fromordinal(o), with_validation=with_validation) == split
    ],
    dtype=np.int64,
  )


def _check_split(split: str, with_validation: bool) -> None:
  if split not in _SPLIT_IDS:
    raise ValueError(f"unknown split {split!r}; valid splits are: " + ", ".join(SPLITS))
  if split == "validation" and not with_validation:
    raise ValueError("split 'validation' exists only with with_validation=True")


def split_dates(split: str, *, with_validation: bool = True) -> list[datetime.date]:
  """All dates of a split, in calendar order (the training dates lose the validation ones if it exists)."""
  _check_split(split, with_validation)
  return [datetime.date.fromordinal(int(o)) for o in _split_ordinals(split, with_validation)]


def _check_count(name: str, value: int) -> None:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
    raise ValueError(f"{name} must be an int, got {value!r}")
  if value < 0:
    raise ValueError(f"{name} must be >= 0, got {value}")


def generate_examples(
  seed: int, num_examples: int, split: str, *, with_validation: bool = True
) -> tuple[list[str], list[str]]:
  """Draws ``num_examples`` (source, target) pairs from one split.

  Dates are uniform over the split's dates, styles uniform over
  ``DATE_FORMATS`` and case variants uniform per style; the result is a
  deterministic function of ``(seed, num_examples, split, with_validation)``.
  """
  _check_count("seed", seed)
  _check_count("num_examples", num_examples)
  _check_split(split, with_validation)
  rng = np.random.default_rng([int(seed), _SPLIT_IDS[split]])
  ordinals = _split_ordinals(split, with_validation)
  date_idx = rng.integers(len(ordinals), size=num_examples)
  style_idx = rng.integers(len(DATE_FORMATS), size=num_examples)
  # One uniform draw per example picks the case variant; drawing it
  # vectorised keeps generation fast for large training sets.
  case_u = rng.random(num_examples)
  sources: list[str] = []
  targets: list[str] = []
  for di, si, u in zip(date_idx.tolist(), style_idx.tolist(), case_u.tolist()):
    date = datetime.date.fromordinal(int(ordinals[di]))
    style = DATE_FORMATS[si]
    cases = style_cases(style)
    case = cases[min(int(u * len(cases)), len(cases) - 1)]
    sources.append(_write(date, style, case))
    targets.append(date.isoformat())
  return sources, targets


def make_splits(
  seed: int, num_train: int, num_test: int, num_validation: int = 0
) -> dict[str, tuple[list[str], list[str]]]:
  """``{split: (sources, targets)}`` for 'train', 'test' and, when ``num_validation > 0``,
  'validation' (whose dates then leave the training split)."""
  _check_count("num_train", num_train)
  _check_count("num_test", num_test)
  _check_count("num_validation", num_validation)
  with_validation = num_validation > 0
  sizes = {"train": num_train, "validation": num_validation, "test": num_test}
  return {
    split: generate_examples(seed, size, split, with_validation=with_validation)
    for split, size in sizes.items()
    if split != "validation" or with_validation
  }
