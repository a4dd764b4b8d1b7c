"""What billing e-mails, decided by the database: quota warnings (once per level) and statements (an outbox)."""
from django.db import models
from django.db.models import Q

from billing.models.invoices import BillingPeriod, Invoice
from qwenhub.models import TimestampedModel


class QuotaWarning(models.Model):
    """A member was warned that a quota of a period reached a level (80 or 100 %): at most once each.

    The row is inserted before the e-mail is sent, and the unique constraint decides: a second
    run, or two at once, finds it there and sends nothing (billing.services.warnings).
    """

    class Kind(models.TextChoices):
        REQUESTS = "requests"
        TOKENS = "tokens"

    LEVELS = (80, 100)

    member = models.ForeignKey("tenants.Member", on_delete=models.PROTECT, related_name="quota_warnings")
    period_start = models.DateField()
    kind = models.CharField(max_length=16, choices=Kind.choices)
    level = models.PositiveSmallIntegerField()  # percent of the limit: 80 or 100
    # used + reserved, and the limit, when the warning was decided.
    used = models.BigIntegerField()
    limit = models.BigIntegerField()
    email = models.EmailField(max_length=254)
    created_at = models.DateTimeField(auto_now_add=True)
    sent_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["member", "period_start", "kind", "level"], name="uniq_quota_warning"),
            models.CheckConstraint(condition=Q(kind__in=["requests", "tokens"]), name="quota_warning_kind_known"),
            models.CheckConstraint(condition=Q(level__in=[80, 100]), name="quota_warning_level_known"),
        ]

    def __str__(self) -> str:
        return f"{self.member_id} {self.period_start:%Y-%m} {self.kind} {self.level}%"
class StatementEmail(TimestampedModel):
    """The statements' outbox: one row per e-mail a finalized period owes (billing.services.statements).

    A member's statement (one per invoice) or the team admins' summary (one per period). The
    Message-ID is made once, when the row is created, and every send of the row carries it,
    so a mail client can tell a resend from a new statement. The status moves only by
    conditional UPDATE: pending → sending (one worker wins the row) → sent; a send refused by
    the server goes back to pending (the next run retries it); a row a later run finds still
    in `sending` (its worker died mid-send: the mail may or may not have left) becomes
    needs_attention and is never sent again without an admin's resend. `last_error` holds the
    error, never the mail's text.
    """

    class Kind(models.TextChoices):
        MEMBER = "member"  # a member's statement of their invoice
        SUMMARY = "summary"  # the period's summary for the team's admins

    class Status(models.TextChoices):
        PENDING = "pending"
        SENDING = "sending"
        SENT = "sent"
        NEEDS_ATTENTION = "needs_attention"

    kind = models.CharField(max_length=16, choices=Kind.choices)
    team = models.ForeignKey("tenants.Team", on_delete=models.PROTECT, related_name="+")
    period = models.ForeignKey(BillingPeriod, on_delete=models.PROTECT, related_name="statement_emails")
    invoice = models.ForeignKey(Invoice, on_delete=models.PROTECT, null=True, blank=True,
                                related_name="statement_emails")
    message_id = models.CharField(max_length=255, unique=True, editable=False)
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.PENDING)
    # Set by each claim (pending → sending); the worker that claimed the row finishes it only
    # while the claim is still its own.
    claim = models.UUIDField(null=True, blank=True, editable=False)
    attempts = models.PositiveIntegerField(default=0)
    recipients = models.JSONField(default=list, blank=True)  # the addresses of the last attempt
    sending_since = models.DateTimeField(null=True, blank=True)
    sent_at = models.DateTimeField(null=True, blank=True)
    last_error = models.CharField(max_length=1000, blank=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["invoice"], condition=Q(kind="member"), name="uniq_statement_invoice"),
            models.UniqueConstraint(fields=["period"], condition=Q(kind="summary"), name="uniq_statement_summary"),
            models.CheckConstraint(condition=Q(kind="member", invoice__isnull=False)
                                   | Q(kind="summary", invoice__isnull=True), name="statement_kind_invoice"),
            models.CheckConstraint(condition=Q(status__in=["pending", "sending", "sent", "needs_attention"]),
                                   name="statement_status_known"),
            models.CheckConstraint(condition=~Q(status="sent") | Q(sent_at__isnull=False),
                                   name="statement_sent_has_time"),
        ]
        indexes = [
            # Each run looks for the period's rows by status (pending to send, sending left behind).
            models.Index(fields=["period", "status"], name="statement_period_status"),
            # The admin's list of what needs a resend, across teams.
            models.Index(fields=["status", "-created_at"], name="statement_status_created"),
        ]

    def __str__(self) -> str:
        what = f"statement of invoice {self.invoice_id}" if self.kind == self.Kind.MEMBER else "admins' summary"
        return f"{what} of period {self.period_id} ({self.status})"
