"""Billing's models, a module each: usage rows, billing policies/periods/invoices, and the e-mail outbox.

The quota counters that usage moves live in tenants (tenants.models, tenants.quota); the
money and the allocation policies are pure code (billing.money, billing.policies).
Re-exported here, so callers write `from billing.models import Invoice`.
"""
from billing.models.invoices import (  # noqa: F401
    AMOUNT, MODEL_WEIGHTS_INVALID, PUBLIC_PRICES_INVALID, WEIGHT, BillingPeriod, BillingPolicy, Invoice,
    InvoiceAdjustment, InvoiceLine, validate_model_weights, validate_public_prices,
)
from billing.models.outbox import QuotaWarning, StatementEmail  # noqa: F401
from billing.models.usage import UsageDay, UsageDayRollup, UsageRecord  # noqa: F401
