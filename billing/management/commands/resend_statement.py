from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand

from billing.selectors import invoice_get_by_number
from billing.services import statement_resend
from tenants.management.base import REASON_MAX, service_errors

INVOICE_UNKNOWN = "No issued invoice is numbered {number!r} (numbers look like LAB-2026-11-007)."
INVOICE_AMBIGUOUS = "Two teams have an invoice numbered {number!r}: resend it from the admin (Statement e-mails)."


class Command(BaseCommand):
    help = ("Send a member's statement again, deliberately: one that was sent, or whose sending was "
            "interrupted (needs_attention). Same Message-ID; recorded in the audit trail.")

    def add_arguments(self, parser):
        parser.add_argument("number", help="The invoice's number, e.g. LAB-2026-11-007.")
        parser.add_argument("--reason", default="", help="Why, for the audit trail.")

    def handle(self, *args, number, reason, **options):
        with service_errors():
            found = invoice_get_by_number(number=number)
            if not found:
                raise ValidationError(INVOICE_UNKNOWN.format(number=number))
            if len(found) > 1:
                raise ValidationError(INVOICE_AMBIGUOUS.format(number=number))
            email = statement_resend(invoice=found[0], actor=None,
                                     reason=(reason.strip() or "resend_statement")[:REASON_MAX])
        self.stdout.write(f"Sent the statement of {number} again to {', '.join(email.recipients)} "
                          f"(attempt {email.attempts}, Message-ID {email.message_id}).")
