"""Money: Decimal only, rounded once to the currency's minor unit, split exactly.

WARNING: changing anything here changes how past and future invoices split a team's cost.
A rerun of an old month's close must give the same cents, so keep old behaviour reachable.

Currency digits come from Babel (CLDR): JPY has 0 decimals, CNY/USD/EUR 2, KWD 3.
"""
import copy
import functools
import math
from decimal import ROUND_HALF_UP, Decimal
from fractions import Fraction

from babel import Locale, UnknownLocaleError
from babel.numbers import format_currency, get_currency_precision
from django.conf import settings
from django.utils import translation

ROUNDING = ROUND_HALF_UP
PRICE_PLACES = 6  # prices per 1M tokens are shown and stored with 6 decimals
ZERO = Decimal(0)


def minor_unit(currency: str) -> Decimal:
    """Return the smallest amount of the currency: Decimal('0.01') for CNY, Decimal('1') for JPY."""
    return Decimal(1).scaleb(-get_currency_precision(currency))


def quantize(amount: Decimal, currency: str) -> Decimal:
    """Round amount to the currency's minor unit (half up), once."""
    return amount.quantize(minor_unit(currency), rounding=ROUNDING)


def allocate(total: Decimal, weights: dict, currency: str) -> dict:
    """Split `total` (already in minor units of `currency`) by weight; the parts always sum to total.

    Weights are exact numbers (int, Decimal or Fraction), so each part is within one minor
    unit of its exact share. Largest remainder: every part gets the floor of its exact share
    in minor units, and the units left over go to the largest remainders; equal remainders
    go to the smaller key first (member ids before named parts), so a rerun gives the same
    split. With no positive weight nothing can be split: every part is zero.
    """
    unit = minor_unit(currency)
    if total != quantize(total, currency) or total < 0:
        raise ValueError(f"{total} is not a non-negative amount in minor units of {currency}")
    exact_weights = {k: Fraction(w) for k, w in weights.items()}
    if any(w < 0 for w in exact_weights.values()):
        raise ValueError("weights must not be negative")
    weight_sum = sum(exact_weights.values(), Fraction(0))
    if weight_sum == 0:
        return {k: ZERO * unit for k in weights}
    units = int(total / unit)
    exact = {k: units * w / weight_sum for k, w in exact_weights.items()}
    parts = {k: math.floor(v) for k, v in exact.items()}
    leftover = units - sum(parts.values())
    for k in sorted(exact, key=lambda k: (parts[k] - exact[k], isinstance(k, str), k))[:leftover]:
        parts[k] += 1
    return {k: Decimal(n) * unit for k, n in parts.items()}


@functools.lru_cache(maxsize=64)
def babel_locale(name: str) -> Locale:
    """Locale.parse, once per name (a page formats hundreds of figures)."""
    return Locale.parse(name)


def format_money(amount: Decimal, currency: str, locale: str = "en") -> str:
    """Format for people (templates and e-mails only; never parsed back)."""
    return format_currency(amount, currency, locale=babel_locale(locale))


# --- display only: never fed back into arithmetic ----------------------------------------

def current_locale() -> str:
    """The active language as a Babel locale name (zh-hans → zh_Hans), English when unknown."""
    name = translation.to_locale(translation.get_language() or settings.LANGUAGE_CODE)
    try:
        return str(babel_locale(name))
    except (UnknownLocaleError, ValueError):
        return "en"


def format_amount(amount: Decimal | None, currency: str, locale: str) -> str:
    """format_money, and "" for no amount (display only)."""
    return "" if amount is None else format_money(amount, currency, locale)


def format_price(amount: Decimal | None, currency: str, locale: str) -> str:
    """A price per 1M tokens in the locale's currency pattern: the currency's decimals, up to PRICE_PLACES."""
    if amount is None:
        return ""
    parsed = babel_locale(locale)
    pattern = copy.copy(parsed.currency_formats["standard"])
    pattern.frac_prec = (get_currency_precision(currency), PRICE_PLACES)
    return pattern.apply(amount, parsed, currency=currency, currency_digits=False)


def format_percent(share: Decimal, locale: str) -> str:
    """The locale's percent pattern (62,50 % in German) with two decimals."""
    parsed = babel_locale(locale)
    pattern = copy.copy(parsed.percent_formats[None])
    pattern.frac_prec = (2, 2)
    return pattern.apply(share, parsed)
