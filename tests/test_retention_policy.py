"""The retention policy (node/retention.py): every rule keeps at least as long as the
law asks, and every doubt keeps longer. Pure functions: no node, no disk."""

from __future__ import annotations

import datetime as dt
import re
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pacsmesh.node.errors import ConfigError
from pacsmesh.node.retention import (
    Expiry,
    RetentionSection,
    deletable_on,
    expiry,
    fingerprint,
    parse_retention,
    status,
    today_utc,
)

D = dt.date
# 2020-01-02 12:00 UTC
RECEIVED_MS = int(dt.datetime(2020, 1, 2, 12, tzinfo=dt.UTC).timestamp() * 1000)
POLICY = RetentionSection(by_modality={"MG": 10, "US": 3})
# Pure functions and no example database: nothing is written into the repository.
PROPERTY = settings(max_examples=150, deadline=None, database=None)


def exp(study: str = "20150304", birth: str = "", modalities: tuple[str, ...] = ("CT",),
        policy: RetentionSection = POLICY, received_ms: int = RECEIVED_MS) -> Expiry:
    return expiry(policy, study, birth, modalities, received_ms)


# --- parsing -------------------------------------------------------------------------

def test_a_missing_or_empty_table_gives_the_defaults() -> None:
    assert parse_retention(None) == RetentionSection()
    policy = parse_retention({})
    assert policy == RetentionSection()
    assert (policy.default_years, policy.by_modality, policy.minor_until_age,
            policy.minor_extra_years, policy.grace_days, policy.delete_expired) == (
        7, {}, 21, 0, 30, False)


def test_a_full_table_parses() -> None:
    policy = parse_retention({"default_years": 6, "by_modality": {"MG": 10, "US": 5},
                              "minor_until_age": 18, "minor_extra_years": 3,
                              "grace_days": 0, "delete_expired": True})
    assert policy == RetentionSection(6, {"MG": 10, "US": 5}, 18, 3, 0, True)


@pytest.mark.parametrize(("raw", "message"), [
    ([1], "[retention] must be a table"),
    ({"years": 7}, "[retention] has an unknown key 'years'"),
    ({"default_years": "7"}, "[retention] default_years = '7' is not an int"),
    ({"default_years": 7.0}, "[retention] default_years = 7.0 is not an int"),
    ({"default_years": True}, "[retention] default_years = True is not an int"),
    ({"minor_until_age": False}, "[retention] minor_until_age = False is not an int"),
    ({"minor_extra_years": "2"}, "[retention] minor_extra_years = '2' is not an int"),
    ({"grace_days": [30]}, "[retention] grace_days = [30] is not an int"),
    ({"delete_expired": 1}, "[retention] delete_expired = 1 is not a bool"),
    ({"delete_expired": "yes"}, "[retention] delete_expired = 'yes' is not a bool"),
    ({"by_modality": 10}, "[retention] by_modality = 10 is not a table"),
    ({"by_modality": {"MG": "10"}}, "[retention.by_modality] MG = '10' is not an int"),
    ({"by_modality": {"MG": True}}, "[retention.by_modality] MG = True is not an int"),
    ({"default_years": 0}, "[retention] default_years = 0 is outside 1..200"),
    ({"default_years": 201}, "[retention] default_years = 201 is outside 1..200"),
    ({"default_years": -7}, "[retention] default_years = -7 is outside 1..200"),
    ({"minor_until_age": -1}, "[retention] minor_until_age = -1 is outside 0..150"),
    ({"minor_until_age": 151}, "[retention] minor_until_age = 151 is outside 0..150"),
    ({"minor_extra_years": -1}, "[retention] minor_extra_years = -1 is outside 0..100"),
    ({"minor_extra_years": 101}, "[retention] minor_extra_years = 101 is outside 0..100"),
    ({"grace_days": -1}, "[retention] grace_days = -1 is outside 0..3650"),
    ({"grace_days": 3651}, "[retention] grace_days = 3651 is outside 0..3650"),
    ({"by_modality": {"MG": 0}}, "[retention.by_modality] MG = 0 is outside 1..200"),
    ({"by_modality": {"MG": 201}}, "[retention.by_modality] MG = 201 is outside 1..200"),
    ({"by_modality": {"mg": 10}}, "[retention.by_modality] 'mg' is not a DICOM modality code "
                                  "(1-16 uppercase letters, digits or _): did you mean 'MG'?"),
    ({"by_modality": {" CT": 10}}, "did you mean 'CT'?"),
    ({"by_modality": {"": 10}}, "[retention.by_modality] '' is not a DICOM modality code"),
    ({"by_modality": {"M-G": 10}}, "'M-G' is not a DICOM modality code"),
    ({"by_modality": {"A" * 17: 10}}, "is not a DICOM modality code"),
])
def test_every_parser_error_names_what_is_wrong(raw: object, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)) as caught:
        parse_retention(raw)
    assert ("did you mean" in str(caught.value)) == ("did you mean" in message)


def test_range_limits_are_inclusive() -> None:
    parse_retention({"default_years": 1, "minor_until_age": 0, "minor_extra_years": 0,
                     "grace_days": 0, "by_modality": {"X_1": 1, "A" * 16: 200}})
    parse_retention({"default_years": 200, "minor_until_age": 150, "minor_extra_years": 100,
                     "grace_days": 3650})


def test_a_policy_cannot_be_built_out_of_range_nor_changed_through_its_dict() -> None:
    with pytest.raises(ConfigError, match="default_years = 0"):
        RetentionSection(default_years=0)
    with pytest.raises(ConfigError, match="'mg'"):
        RetentionSection(by_modality={"mg": 10})
    given_dict = {"MG": 10}
    policy = RetentionSection(by_modality=given_dict)
    given_dict["MG"] = 1
    assert policy.by_modality == {"MG": 10}


# --- fingerprint ---------------------------------------------------------------------

def test_fingerprint_is_equal_for_equal_policies_whatever_the_order() -> None:
    a = parse_retention({"by_modality": {"MG": 10, "US": 3, "CT": 8}})
    b = parse_retention({"by_modality": {"CT": 8, "US": 3, "MG": 10}})
    assert fingerprint(a) == fingerprint(b)
    assert re.fullmatch(r"[0-9a-f]{16}", fingerprint(a))
    assert fingerprint(RetentionSection()) == fingerprint(parse_retention({}))


@pytest.mark.parametrize("change", [
    {"default_years": 8}, {"by_modality": {"MG": 10}}, {"by_modality": {"MG": 11, "US": 3}},
    {"by_modality": {"MG": 10, "US": 3, "CT": 7}}, {"minor_until_age": 18},
    {"minor_extra_years": 1}, {"grace_days": 31}, {"delete_expired": True},
])
def test_fingerprint_differs_when_any_field_does(change: dict[str, Any]) -> None:
    base = {"default_years": 7, "by_modality": {"MG": 10, "US": 3}}
    assert fingerprint(parse_retention(base)) != fingerprint(parse_retention({**base, **change}))


# --- the period by modality ----------------------------------------------------------

def test_defaults_keep_seven_years_from_the_study_date() -> None:
    e = expiry(RetentionSection(), "20150304", "", ["CT"], RECEIVED_MS)
    assert e == Expiry(D(2022, 3, 4), "study date 2015-03-04 + 7 years (default)")
    assert exp(modalities=()).expires == D(2022, 3, 4)  # no modality: the default


def test_a_modality_may_be_longer_or_shorter_than_the_default() -> None:
    assert exp(modalities=("MG",)) == Expiry(D(2025, 3, 4),
                                             "study date 2015-03-04 + 10 years (MG)")
    assert exp(modalities=("US",)) == Expiry(D(2018, 3, 4),
                                             "study date 2015-03-04 + 3 years (US)")


def test_a_mixed_study_takes_its_longest_period() -> None:
    assert exp(modalities=("US", "CT")).expires == D(2022, 3, 4)  # CT: the default
    assert exp(modalities=("US", "MG", "CT")).rule == "study date 2015-03-04 + 10 years (MG)"
    assert exp(modalities=("US", "US")).expires == D(2018, 3, 4)


def test_padded_and_lowercase_codes_never_shorten() -> None:
    # DICOM pads odd-length values: "US " is US
    assert exp(modalities=("US ",)).expires == D(2018, 3, 4)
    assert exp(modalities=("MG\x00",)).expires == D(2025, 3, 4)
    # "mg" is probably MG: its longer period applies; "us" is not surely US: the default
    assert exp(modalities=("mg",)).expires == D(2025, 3, 4)
    assert exp(modalities=("us",)) == Expiry(D(2022, 3, 4),
                                             "study date 2015-03-04 + 7 years (default)")


def test_a_rule_names_only_configured_codes() -> None:
    e = exp(modalities=("MR. SMITH^JOHN",))  # garbage in a modality field
    assert e.rule == "study date 2015-03-04 + 7 years (default)"


# --- minors --------------------------------------------------------------------------

def test_a_child_is_kept_until_the_age_limit() -> None:
    e = exp(study="20150304", birth="20100601")
    assert e == Expiry(D(2031, 6, 1), "minor: born 2010-06-01, kept until age 21 + 0 years")


def test_an_adult_is_kept_by_the_study_rule() -> None:
    e = exp(study="20150304", birth="19700101")
    assert e == Expiry(D(2022, 3, 4), "study date 2015-03-04 + 7 years (default)")


def test_a_tie_is_named_by_the_study_rule() -> None:
    policy = RetentionSection(minor_until_age=7)
    assert exp(study="20150304", birth="20150304", policy=policy).rule.startswith("study date")


def test_extra_years_lengthen_the_minor_rule() -> None:
    policy = RetentionSection(minor_until_age=18, minor_extra_years=3)
    e = exp(study="20150304", birth="20100601", policy=policy)
    assert e == Expiry(D(2031, 6, 1), "minor: born 2010-06-01, kept until age 18 + 3 years")


def test_a_birth_on_the_day_after_the_study_is_plausible() -> None:
    assert exp(study="20150304", birth="20150305").expires == D(2036, 3, 5)
    assert exp(study="20150304", birth="20150306").expires is None


@pytest.mark.parametrize(("birth", "why"), [
    ("20101345", "birth date '20101345' unreadable"),
    ("2010-06-01", "birth date '2010-06-01' unreadable"),  # ISO is not DA
    ("20100230", "birth date '20100230' unreadable"),
    ("18491231", "birth date '18491231' unreadable"),
    ("2010061", "birth date '2010061' unreadable"),
    ("20160101", "birth date 2016-01-01 after the study (2015-03-04)"),
    ("SMITH^JOHN", "birth date (10 characters, not a date) unreadable"),
])
def test_a_garbled_or_implausible_birth_date_keeps_until_an_operator_decides(
        birth: str, why: str) -> None:
    e = exp(study="20150304", birth=birth)
    assert e.expires is None
    assert e.rule == f"{why}: kept until an operator decides"
    assert "SMITH" not in e.rule


def test_an_empty_or_padded_birth_date_is_absent() -> None:
    assert exp(birth="  ").expires == D(2022, 3, 4)
    assert exp(birth="\x00").expires == D(2022, 3, 4)


# --- dates ---------------------------------------------------------------------------

def test_feb_29_plus_years_lands_on_mar_1() -> None:
    assert exp(study="20160229").expires == D(2023, 3, 1)
    policy = RetentionSection(default_years=4)
    assert exp(study="20160229", policy=policy).expires == D(2020, 2, 29)  # leap to leap
    assert exp(study="20150304", birth="20080229").expires == D(2029, 3, 1)


def test_acr_nema_and_padded_dates_are_read() -> None:
    assert exp(study="2015.03.04") == exp(study="20150304")
    assert exp(study=" 20150304\x00").expires == D(2022, 3, 4)
    assert exp(study="2015.03.04", birth="2010.06.01 ").expires == D(2031, 6, 1)
    assert exp(study="2015.0304").expires == D(2027, 1, 2)  # mixed forms: unreadable


@pytest.mark.parametrize(("study", "lacking"), [
    ("", "no study date"),
    ("  ", "no study date"),
    ("20151345", "study date '20151345' unreadable"),
    ("20150230", "study date '20150230' unreadable"),
    ("18000101", "study date '18000101' unreadable"),
    ("2015034", "study date '2015034' unreadable"),
    ("ANONYMOUS", "study date (9 characters, not a date) unreadable"),
])
def test_a_missing_or_garbled_study_date_counts_from_receipt(study: str, lacking: str) -> None:
    e = exp(study=study)
    assert e == Expiry(D(2027, 1, 2), f"{lacking}: received 2020-01-02 + 7 years (default)")


def test_without_study_date_or_receipt_time_an_operator_decides() -> None:
    e = exp(study="", received_ms=0)
    assert e == Expiry(None, "no study date and no receipt time: kept until an operator decides")


def test_the_birth_date_is_checked_against_the_receipt_date_when_it_stands_in() -> None:
    assert exp(study="", birth="20190101").expires == D(2040, 1, 1)
    assert exp(study="", birth="20200104").expires is None


def test_dates_past_the_calendar_keep() -> None:
    assert exp(study="99990101").expires is None
    e = exp(study="99800101", birth="99800101")
    assert e == Expiry(None, "minor: born 9980-01-01, kept until age 21 + 0 years is past "
                             "the year 9999: kept until an operator decides")
    e = Expiry(D(9999, 12, 20), "")  # the grace period would pass the calendar's end
    assert deletable_on(e, POLICY) is None
    assert status(e, POLICY, D(9999, 12, 31)) == "expired"


# --- status --------------------------------------------------------------------------

def test_status_boundaries() -> None:
    e = exp()  # expires 2022-03-04, deletable from 2022-04-03
    assert deletable_on(e, POLICY) == D(2022, 4, 3)
    assert status(e, POLICY, D(2022, 3, 3)) == "kept"
    assert status(e, POLICY, D(2022, 3, 4)) == "expired"
    assert status(e, POLICY, D(2022, 4, 2)) == "expired"
    assert status(e, POLICY, D(2022, 4, 3)) == "deletable"
    no_grace = RetentionSection(grace_days=0)
    assert status(e, no_grace, D(2022, 3, 3)) == "kept"
    assert status(e, no_grace, D(2022, 3, 4)) == "deletable"


def test_status_is_by_date_only_and_no_expiry_is_always_kept() -> None:
    e = exp()
    allowed = RetentionSection(grace_days=30, delete_expired=True)
    assert status(e, POLICY, D(2030, 1, 1)) == status(e, allowed, D(2030, 1, 1)) == "deletable"
    never = Expiry(None, "x")
    assert deletable_on(never, POLICY) is None
    assert status(never, POLICY, D(9999, 12, 31)) == "kept"


def test_today_is_the_utc_date() -> None:
    assert today_utc(0.0) == D(1970, 1, 1)
    assert today_utc(RECEIVED_MS / 1000) == D(2020, 1, 2)
    assert today_utc(dt.datetime(2020, 1, 2, 23, 59, 59, tzinfo=dt.UTC).timestamp()) == D(
        2020, 1, 2)


# --- properties ----------------------------------------------------------------------

CODES = ("CT", "MR", "MG", "US", "DX", "SEG")
DAY_MIN, DAY_MAX = D(1850, 1, 1), D(2300, 12, 31)
GARBLED = ("", "  ", "20151345", "20150230", "18000101", "2015034", "SMITH^JOHN", "2015-03-04")


@st.composite
def policies(draw: st.DrawFn) -> RetentionSection:
    return RetentionSection(
        default_years=draw(st.integers(1, 200)),
        by_modality=draw(st.dictionaries(st.sampled_from(CODES), st.integers(1, 200))),
        minor_until_age=draw(st.integers(0, 150)),
        minor_extra_years=draw(st.integers(0, 100)),
        grace_days=draw(st.integers(0, 3650)),
        delete_expired=draw(st.booleans()),
    )


def da(day: dt.date) -> str:
    return day.strftime("%Y%m%d") if day.year >= 1000 else f"{day.year:04d}{day:%m%d}"


days = st.dates(DAY_MIN, DAY_MAX)
modality_lists = st.lists(st.sampled_from((*CODES, "OT", "")), max_size=4)
received = st.integers(1, 10_000_000_000_000)


def later_or_equal(a: Expiry, b: Expiry) -> bool:
    """b keeps at least as long as a; no expiry is the latest."""
    return b.expires is None or (a.expires is not None and b.expires >= a.expires)


@PROPERTY
@given(policies(), days, st.integers(0, 40_000), st.one_of(st.none(), st.integers(-1, 60_000)),
       modality_lists, received)
def test_a_later_study_date_never_expires_earlier(
        policy: RetentionSection, study: dt.date, later_by: int, birth_before: int | None,
        modalities: list[str], received_ms: int) -> None:
    later = min(study + dt.timedelta(days=later_by), D(9999, 12, 31))
    # A birth date after the earlier study has no expiry there: plausible at the later
    # one, it may get one. That is a correction of garbage, not a shorter period.
    birth = "" if birth_before is None else da(max(study - dt.timedelta(days=birth_before),
                                                   DAY_MIN))
    a = expiry(policy, da(study), birth, modalities, received_ms)
    b = expiry(policy, da(later), birth, modalities, received_ms)
    assert later_or_equal(a, b)


@PROPERTY
@given(policies(), st.one_of(days.map(da), st.sampled_from(GARBLED)), days,
       st.integers(0, 40_000), modality_lists, received)
def test_a_later_or_added_birth_date_never_expires_earlier(
        policy: RetentionSection, study: str, birth: dt.date, later_by: int,
        modalities: list[str], received_ms: int) -> None:
    later = birth + dt.timedelta(days=later_by)
    none = expiry(policy, study, "", modalities, received_ms)
    a = expiry(policy, study, da(birth), modalities, received_ms)
    b = expiry(policy, study, da(later), modalities, received_ms)
    assert later_or_equal(none, a)
    assert later_or_equal(a, b)


@PROPERTY
@given(policies(), st.one_of(days.map(da), st.sampled_from(GARBLED)),
       st.one_of(st.just(""), days.map(da), st.sampled_from(GARBLED)),
       modality_lists.filter(bool), st.sampled_from((*CODES, "OT", "mg", "US ")), received)
def test_an_added_modality_never_expires_earlier(
        policy: RetentionSection, study: str, birth: str, modalities: list[str], added: str,
        received_ms: int) -> None:
    # From a known modality on: a study with none recorded takes the default, which a
    # first modality with a shorter period may lower (tested above).
    a = expiry(policy, study, birth, modalities, received_ms)
    b = expiry(policy, study, birth, [*modalities, added], received_ms)
    assert later_or_equal(a, b)


@PROPERTY
@given(policies(), st.one_of(days, st.sampled_from(GARBLED)),
       st.one_of(st.just(""), days.map(da), st.sampled_from(GARBLED)), modality_lists, received)
def test_never_earlier_than_the_shortest_configured_period(
        policy: RetentionSection, study: dt.date | str, birth: str, modalities: list[str],
        received_ms: int) -> None:
    if isinstance(study, dt.date):
        used, study_text = study, da(study)
    else:
        used, study_text = dt.date(1970, 1, 1) + dt.timedelta(
            milliseconds=received_ms), study
    e = expiry(policy, study_text, birth, modalities, received_ms)
    shortest = min([policy.default_years, *policy.by_modality.values()])
    if used.year + shortest > dt.MAXYEAR:
        assert e.expires is None
        return
    floor = D(used.year + shortest, used.month, min(used.day, 28) if used.month == 2
              else used.day)
    assert e.expires is None or e.expires >= floor
