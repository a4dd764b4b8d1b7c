"""Writes for billing (a module each); every state change leaves an AuditEvent.

Re-exported here, so callers write `from billing.services import period_close`.
"""
from billing.services.invoices import (  # noqa: F401
    ADJUSTMENT_INVALID, INVOICE_NOT_FINALIZED, REASON_REQUIRED, invoice_adjust, invoices_write_drafts,
)
from billing.services.periods import (  # noqa: F401
    COST_INVALID, COST_REASON_REQUIRED, PERIOD_FINALIZED_ALREADY, PERIOD_NOT_FIRST, PERIOD_NOT_OVER, PERIOD_OPEN,
    invoice_number, period_close, period_finalize, period_set_actual_cost,
)
from billing.services.policies import (  # noqa: F401
    IDLE_PAYER_OTHER_TEAM, POLICY_FIELD_UNKNOWN, billing_policy_get_or_create, billing_policy_update,
)
from billing.services.warnings import quota_warnings_send  # noqa: F401
from billing.services.statements import (  # noqa: F401
    STATEMENT_CHANGED, STATEMENT_NOT_CREATED, STATEMENT_NOT_FINALIZED, STATEMENT_PENDING, STATEMENT_SEND_FAILED,
    STATEMENT_SENDING, STATEMENTS_PERIOD_NOT_FINALIZED, period_statements_send, statement_email_resend,
    statement_resend,
)
