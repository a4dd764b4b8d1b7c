"""Numbers as people read them, in the page's language: money, counts, percents (display only)."""
from decimal import Decimal

from babel.numbers import format_decimal
from django import template

from billing.money import babel_locale, current_locale, format_amount, format_percent, format_price

register = template.Library()


@register.filter
def money(amount, currency):
    """{{ invoice.amount|money:team.currency }} → ¥3,000.00 (the locale's pattern)."""
    return format_amount(None if amount in (None, "") else Decimal(str(amount)), currency, current_locale())


@register.filter
def price(amount, currency):
    """A price per 1M tokens, up to six decimals."""
    return format_price(None if amount in (None, "") else Decimal(str(amount)), currency, current_locale())


@register.filter
def number(value):
    """12345 → 12,345 (the locale's separators); "" for None."""
    if value in (None, ""):
        return ""
    return format_decimal(value, locale=babel_locale(current_locale()))


@register.filter
def percent(share):
    """0.625 → 62.50% (a share, not a percentage)."""
    if share in (None, ""):
        return ""
    return format_percent(Decimal(str(share)), current_locale())


@register.filter
def ratio(used, limit):
    """used ÷ limit clamped to 0..1 for a bar's width; 0 when the limit is unlimited or zero."""
    if not limit or used is None:
        return 0
    return min(1, max(0, used / limit))
