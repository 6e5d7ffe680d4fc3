"""Tests for the date-normalisation task and the character vocabulary.

The parser below is written independently of ``dates.py`` (regexes plus the
``calendar`` module's English names) so that a formatting bug cannot be
mirrored by the check that is meant to catch it.
"""

from __future__ import annotations

import calendar
import collections
import datetime
import json
import re

import numpy as np
import pytest

from tmoe_jax.data import dates
from tmoe_jax.data.vocabulary import CharVocabulary

FIRST = datetime.date(1950, 1, 1)
LAST = datetime.date(2049, 12, 31)
ALL_DATES = [datetime.date.fromordinal(o) for o in range(FIRST.toordinal(), LAST.toordinal() + 1)]

# --------------------------------------------------------------------------
# Independent slow parser.

_MONTHS = {calendar.month_name[i].lower(): i for i in range(1, 13)}
_MONS = {calendar.month_abbr[i].lower(): i for i in range(1, 13)}
_WEEKDAYS = {calendar.day_name[i].lower(): i for i in range(7)}
_WKDS = {calendar.day_abbr[i].lower(): i for i in range(7)}

_D = r"(?P<d>[1-9]\d?)"  # day, no zero padding
_DD = r"(?P<d>\d\d)"  # day, zero padded
_M = r"(?P<m>[1-9]\d?)"
_MM = r"(?P<m>\d\d)"
_Y = r"(?P<y>\d{4})"
_YY = r"(?P<yy>\d\d)"
_ORD = r"(?P<d>[1-9]\d?)(?P<suffix>st|nd|rd|th)"
_MONTH = r"(?P<month>[a-z]+)"
_MON = r"(?P<mon>[a-z]{3})"
_WEEKDAY = r"(?P<weekday>[a-z]+)"
_WKD = r"(?P<wkd>[a-z]{3})"

PATTERNS = {
  "weekday_day_month_year": rf"{_WEEKDAY}, {_D} {_MONTH} {_Y}",
  "weekday_month_day_year": rf"{_WEEKDAY}, {_MONTH} {_D}, {_Y}",
  "day_month_year": rf"{_D} {_MONTH} {_Y}",
  "month_day_year": rf"{_MONTH} {_D}, {_Y}",
  "month_ordinal_short_year": rf"{_MONTH} {_ORD}, '{_YY}",
  "ordinal_of_month_year": rf"{_ORD} of {_MONTH} {_Y}",
  "month_the_ordinal_year": rf"{_MONTH} the {_ORD}, {_Y}",
  "mon_day_year": rf"{_MON} {_D} {_Y}",
  "day_mon_short_year": rf"{_D} {_MON} {_YY}",
  "wkd_day_mon_year": rf"{_WKD} {_D} {_MON} {_Y}",
  "wkd_mon_day_year": rf"{_WKD}, {_MON} {_D}, {_Y}",
  "dd_mon_yyyy_dashes": rf"{_DD}-{_MON}-{_Y}",
  "ymd_slashes": rf"{_Y}/{_MM}/{_DD}",
  "dmy_dots": rf"{_D}\.{_M}\.{_Y}",
  "mdy_slashes_short_year": rf"{_M}/{_D}/{_YY}",
  "compact": rf"{_Y}{_MM}{_DD}",
}
_COMPILED = {k: re.compile(v) for k, v in PATTERNS.items()}


def _suffix(day: int) -> str:
  if day in (11, 12, 13):
    return "th"
  return {1: "st", 2: "nd", 3: "rd"}.get(day % 10, "th")


def parse(style: str, text: str) -> datetime.date | None:
  """Date written by ``text`` in ``style``, or None if it is not valid."""
  lowered = text.lower()
  # Only whole-string case variants are allowed.
  if text not in (lowered, text.upper()) and not _is_title_form(text):
    return None
  match = _COMPILED[style].fullmatch(lowered)
  if match is None:
    return None
  g = match.groupdict()
  if g.get("y") is not None:
    year = int(g["y"])
  else:
    yy = int(g["yy"])
    year = 1900 + yy if yy >= 50 else 2000 + yy
  if g.get("m") is not None:
    month = int(g["m"])
  elif g.get("month") is not None:
    if g["month"] not in _MONTHS:
      return None
    month = _MONTHS[g["month"]]
  else:
    if g["mon"] not in _MONS:
      return None
    month = _MONS[g["mon"]]
  day = int(g["d"])
  try:
    date = datetime.date(year, month, day)
  except ValueError:
    return None
  if g.get("suffix") is not None and g["suffix"] != _suffix(day):
    return None
  if g.get("weekday") is not None:
    if _WEEKDAYS.get(g["weekday"]) != date.weekday():
      return None
  if g.get("wkd") is not None:
    if _WKDS.get(g["wkd"]) != date.weekday():
      return None
  return date


def _is_title_form(text: str) -> bool:
  # Title form: every alphabetic word is capitalised, except the
  # lower-case connectives and ordinal suffixes.
  for word in re.findall(r"[A-Za-z]+", text):
    if word in ("of", "the", "st", "nd", "rd", "th"):
      continue
    if not (word[0].isupper() and word[1:].islower()):
      return False
  return True


def parse_any(text: str) -> list[tuple[str, datetime.date]]:
  found = []
  for style in PATTERNS:
    date = parse(style, text)
    if date is not None:
      found.append((style, date))
  return found


# --------------------------------------------------------------------------
# Styles.


def test_parser_covers_every_style():
  assert set(PATTERNS) == set(dates.DATE_FORMATS)
  assert 12 <= len(dates.DATE_FORMATS) <= 20


GOLDEN = {
  "weekday_day_month_year": "Tuesday, 3 March 1998",
  "weekday_month_day_year": "Tuesday, March 3, 1998",
  "day_month_year": "3 March 1998",
  "month_day_year": "March 3, 1998",
  "month_ordinal_short_year": "March 3rd, '98",
  "ordinal_of_month_year": "3rd of March 1998",
  "month_the_ordinal_year": "March the 3rd, 1998",
  "mon_day_year": "Mar 3 1998",
  "day_mon_short_year": "3 MAR 98",
  "wkd_day_mon_year": "tue 3 mar 1998",
  "wkd_mon_day_year": "Tue, Mar 3, 1998",
  "dd_mon_yyyy_dashes": "03-Mar-1998",
  "ymd_slashes": "1998/03/03",
  "dmy_dots": "3.3.1998",
  "mdy_slashes_short_year": "3/3/98",
  "compact": "19980303",
}


@pytest.mark.parametrize("style", sorted(GOLDEN))
def test_golden_canonical_strings(style):
  assert dates.format_date(datetime.date(1998, 3, 3), style) == GOLDEN[style]


def test_numeric_field_orders_fixed_by_separator():
  d = datetime.date(2007, 11, 5)  # day != month, so order is visible
  assert dates.format_date(d, "dmy_dots") == "5.11.2007"
  assert dates.format_date(d, "mdy_slashes_short_year") == "11/5/07"
  assert dates.format_date(d, "ymd_slashes") == "2007/11/05"


def test_two_digit_year_rule_at_boundaries():
  assert dates.format_date(datetime.date(1950, 1, 1), "mdy_slashes_short_year") == "1/1/50"
  assert dates.format_date(datetime.date(2049, 12, 31), "mdy_slashes_short_year") == "12/31/49"
  assert parse("day_mon_short_year", "31 DEC 49") == datetime.date(2049, 12, 31)
  assert parse("day_mon_short_year", "1 JAN 50") == datetime.date(1950, 1, 1)


def test_ordinal_suffixes():
  got = [
    dates.format_date(datetime.date(2001, 1, d), "ordinal_of_month_year").split()[0]
    for d in (1, 2, 3, 4, 11, 12, 13, 21, 22, 23, 31)
  ]
  assert got == ["1st", "2nd", "3rd", "4th", "11th", "12th", "13th", "21st", "22nd", "23rd", "31st"]


def test_every_style_round_trips_on_all_dates():
  # Canonical case, exhaustive over the date range; weekday correctness is
  # enforced by the parser.
  for style in dates.DATE_FORMATS:
    for date in ALL_DATES:
      text = dates.format_date(date, style)
      assert parse(style, text) == date, (style, text, date)


def test_parser_is_not_vacuous():
  assert parse("weekday_day_month_year", "Tuesday, 3 March 1998") == datetime.date(1998, 3, 3)
  assert parse("weekday_day_month_year", "Monday, 3 March 1998") is None
  assert parse("wkd_day_mon_year", "wed 3 mar 1998") is None
  assert parse("ordinal_of_month_year", "3th of March 1998") is None
  assert parse("dmy_dots", "31.2.1998") is None
  assert parse("mdy_slashes_short_year", "03/3/98") is None
  assert parse("day_month_year", "3 mARCH 1998") is None


def test_every_style_round_trips_with_random_case():
  rng = np.random.default_rng(123)
  seen_cases = collections.defaultdict(set)
  for style in dates.DATE_FORMATS:
    for ordinal in rng.integers(FIRST.toordinal(), LAST.toordinal() + 1, size=300):
      date = datetime.date.fromordinal(int(ordinal))
      text = dates.format_date(date, style, rng)
      assert parse(style, text) == date, (style, text, date)
      assert parse_any(text) == [(style, date)], text
      seen_cases[style].add("lower" if text == text.lower() else "upper" if text == text.upper() else "title")
  # Styles with letters really show more than one case.
  assert len(seen_cases["weekday_day_month_year"]) == 3
  assert len(seen_cases["dd_mon_yyyy_dashes"]) == 3
  assert dates.style_cases("compact") == ("title",)


def test_weekdays_are_correct():
  rng = np.random.default_rng(5)
  for ordinal in rng.integers(FIRST.toordinal(), LAST.toordinal() + 1, size=500):
    date = datetime.date.fromordinal(int(ordinal))
    long_name = dates.format_date(date, "weekday_day_month_year").split(",")[0]
    short_name = dates.format_date(date, "wkd_day_mon_year").split()[0]
    assert long_name == calendar.day_name[date.weekday()]
    assert short_name == calendar.day_abbr[date.weekday()].lower()
    assert date.strftime("%A") == long_name  # C locale under pytest


def test_injective_over_all_dates_and_styles_and_max_length():
  # Lower-casing erases the case variants; if the lower-cased strings of all
  # (date, style) pairs are distinct, every variant determines its date.
  seen: dict[str, datetime.date] = {}
  longest = 0
  for style in dates.DATE_FORMATS:
    for date in ALL_DATES:
      text = dates.format_date(date, style)
      longest = max(longest, len(text))
      key = text.lower()
      other = seen.setdefault(key, date)
      assert other == date, (key, other, date)
  assert len(seen) == len(ALL_DATES) * len(dates.DATE_FORMATS)
  assert longest == dates.MAX_SOURCE_LENGTH
  assert dates.MAX_SOURCE_LENGTH <= 40
  assert dates.TARGET_LENGTH == 10


def test_rejects_bad_arguments():
  with pytest.raises(ValueError, match="valid styles are: .*compact"):
    dates.format_date(datetime.date(2000, 1, 1), "klingon")
  with pytest.raises(ValueError, match="outside the supported range"):
    dates.format_date(datetime.date(2050, 1, 1), "compact")
  with pytest.raises(ValueError, match="datetime.date"):
    dates.format_date(datetime.datetime(2000, 1, 1), "compact")
  with pytest.raises(ValueError, match="num_examples must be >= 0"):
    dates.generate_examples(0, -1, "train")
  with pytest.raises(ValueError, match="valid splits are: train, validation, test"):
    dates.generate_examples(0, 1, "dev")
  with pytest.raises(ValueError, match="'validation' exists only with with_validation=True"):
    dates.generate_examples(0, 1, "validation", with_validation=False)
  with pytest.raises(ValueError, match="num_validation"):
    dates.make_splits(0, 1, 1, -2)
  with pytest.raises(ValueError, match="seed"):
    dates.generate_examples(-3, 1, "train")
  with pytest.raises(ValueError, match="num_test"):
    dates.make_splits(0, 1, -1)


# --------------------------------------------------------------------------
# Splits.


def test_date_split_partitions_range_with_sane_fraction():
  train = set(dates.split_dates("train", with_validation=False))
  test = set(dates.split_dates("test"))
  assert not train & test
  assert train | test == set(ALL_DATES)
  fraction = len(test) / len(ALL_DATES)
  assert 0.08 < fraction < 0.12, fraction
  # Held-out dates are spread over the whole range, not one block.
  years = {d.year for d in test}
  assert len(years) == 100


def test_validation_dates_leave_training_and_never_touch_test():
  train = set(dates.split_dates("train"))
  validation = set(dates.split_dates("validation"))
  test = set(dates.split_dates("test"))
  assert not (train & validation or train & test or validation & test)
  assert train | validation | test == set(ALL_DATES)
  # Test dates are the same with or without a validation split; validation comes out of train.
  assert test == set(dates.split_dates("test", with_validation=False))
  assert train | validation == set(dates.split_dates("train", with_validation=False))
  assert 0.03 < len(validation) / len(ALL_DATES) < 0.07
  splits = dates.make_splits(0, 2_000, 100, 500)
  assert set(splits) == {"train", "validation", "test"}
  for split, wanted in (("train", train), ("validation", validation)):
    assert {datetime.date.fromisoformat(t) for t in splits[split][1]} <= wanted
  # Without a validation split, training keeps every non-test date (old runs resume unchanged).
  assert dates.make_splits(0, 300, 50)["train"] == dates.generate_examples(
    0, 300, "train", with_validation=False
  )


def test_determinism():
  a = dates.make_splits(7, 300, 50)
  b = dates.make_splits(7, 300, 50)
  c = dates.make_splits(8, 300, 50)
  assert a == b
  assert a["train"] != c["train"] and a["test"] != c["test"]
  assert set(a) == {"train", "test"}
  assert dates.generate_examples(7, 0, "test") == ([], [])


def test_generated_examples_are_correct_and_disjoint():
  splits = dates.make_splits(0, 12_000, 3_000)
  test_dates = set(dates.split_dates("test"))
  parsed = {}
  for split, (sources, targets) in splits.items():
    assert len(sources) == len(targets)
    styles = collections.Counter()
    split_dates = set()
    for source, target in zip(sources, targets):
      assert re.fullmatch(r"\d{4}-\d\d-\d\d", target)
      date = datetime.date.fromisoformat(target)
      matches = parse_any(source)
      assert matches == [(matches[0][0], date)], (source, target, matches)
      assert len(source) <= dates.MAX_SOURCE_LENGTH
      assert (date in test_dates) == (split == "test")  # no validation split here: train is the rest
      styles[matches[0][0]] += 1
      split_dates.add(date)
    # All styles appear, roughly uniformly.
    expected = len(sources) / len(dates.DATE_FORMATS)
    assert set(styles) == set(dates.DATE_FORMATS), split
    assert all(0.6 * expected < n < 1.4 * expected for n in styles.values()), styles
    parsed[split] = split_dates
  assert not parsed["train"] & parsed["test"]
  # 3000 uniform draws over ~3650 test dates hit a good share of them.
  assert len(parsed["test"]) > 0.4 * len(test_dates)
  # Mixed case really occurs in the data.
  train_sources = splits["train"][0]
  assert any(s.isupper() for s in train_sources)
  assert any(s.islower() for s in train_sources)


# --------------------------------------------------------------------------
# Vocabulary.


def test_vocabulary_round_trip_and_specials():
  vocab = CharVocabulary("abc-")
  assert (vocab.PAD_ID, vocab.BOS_ID, vocab.EOS_ID, vocab.UNK_ID) == (0, 1, 2, 3)
  assert vocab.size == 8
  assert vocab.encode("ab") == [4, 5, 2]
  assert vocab.encode("ab", add_bos=True, add_eos=False) == [1, 4, 5]
  assert vocab.encode("") == [2]
  assert vocab.encode("az") == [4, 3, 2]
  assert vocab.decode([1, 4, 0, 7, 2, 5, 5]) == "a-"
  assert vocab.decode(np.array([4, 5, 6], dtype=np.int32)) == "abc"
  assert vocab.decode([]) == ""
  assert vocab.decode(vocab.encode("cab-", add_bos=True)) == "cab-"
  with pytest.raises(ValueError, match="out of range"):
    vocab.decode([9])


def test_vocabulary_from_texts_covers_task():
  sources, targets = dates.generate_examples(1, 2000, "train")
  vocab = CharVocabulary.from_texts(sources + targets)
  assert vocab.characters == "".join(sorted(set("".join(sources + targets))))
  for text in sources[:200] + targets[:200]:
    ids = vocab.encode(text)
    assert vocab.UNK_ID not in ids
    assert vocab.decode(ids) == text


def test_encode_batch_padding_and_too_long():
  vocab = CharVocabulary("0123456789-")
  batch = vocab.encode_batch(["12", "", "2049-12-31"], 11)
  assert batch.dtype == np.int32 and batch.shape == (3, 11)
  assert batch[0].tolist() == [5, 6, 2] + [0] * 8
  assert batch[1].tolist() == [2] + [0] * 10
  assert vocab.decode(batch[2]) == "2049-12-31"
  assert batch[2, -1] == vocab.EOS_ID
  assert vocab.encode_batch([], 4).shape == (0, 4)
  with pytest.raises(ValueError, match=r"'2049-12-31'.*12 ids.*max_length=11"):
    vocab.encode_batch(["2049-12-31"], 11, add_bos=True)


def test_vocabulary_validation_and_json():
  with pytest.raises(ValueError, match="duplicate characters.*'ab'"):
    CharVocabulary("abcab")
  with pytest.raises(ValueError, match="empty"):
    CharVocabulary("")
  with pytest.raises(ValueError, match="reserved"):
    CharVocabulary("a\ufffd")
  with pytest.raises(ValueError, match="not a str"):
    CharVocabulary.from_texts("abc")
  vocab = CharVocabulary("zy' ,/.")
  restored = CharVocabulary.from_json(vocab.to_json())
  assert restored == vocab and restored.characters == "zy' ,/."
  assert json.loads(vocab.to_json())["characters"] == "zy' ,/."
  with pytest.raises(ValueError, match="not a CharVocabulary"):
    CharVocabulary.from_json('{"characters": "ab"}')
  with pytest.raises(ValueError, match="not a CharVocabulary"):
    CharVocabulary.from_json("{")
