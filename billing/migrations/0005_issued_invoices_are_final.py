"""Issued invoices and their lines never change: PostgreSQL refuses it (the services never try).

A correction of an issued invoice is an adjustment line on a later month (invoice_adjust).
SQLite (the embedded default, for trying things locally) gets no trigger.
"""
from django.db import migrations

FORWARD = """
CREATE OR REPLACE FUNCTION billing_issued_invoice_is_final() RETURNS trigger AS $$
BEGIN
  RAISE EXCEPTION 'invoice % is issued: it never changes (correct it on a later month)', OLD.id
    USING ERRCODE = 'integrity_constraint_violation';
END $$ LANGUAGE plpgsql;

CREATE TRIGGER billing_invoice_issued_is_final BEFORE UPDATE OR DELETE ON billing_invoice
  FOR EACH ROW WHEN (OLD.issued_at IS NOT NULL) EXECUTE FUNCTION billing_issued_invoice_is_final();

CREATE OR REPLACE FUNCTION billing_issued_invoice_lines_are_final() RETURNS trigger AS $$
DECLARE
  target bigint;
BEGIN
  IF TG_OP = 'INSERT' THEN target := NEW.invoice_id; ELSE target := OLD.invoice_id; END IF;
  IF EXISTS (SELECT 1 FROM billing_invoice WHERE id = target AND issued_at IS NOT NULL) THEN
    RAISE EXCEPTION 'invoice % is issued: its lines never change (correct it on a later month)', target
      USING ERRCODE = 'integrity_constraint_violation';
  END IF;
  IF TG_OP = 'DELETE' THEN RETURN OLD; END IF;
  RETURN NEW;
END $$ LANGUAGE plpgsql;

CREATE TRIGGER billing_invoiceline_issued_is_final BEFORE INSERT OR UPDATE OR DELETE ON billing_invoiceline
  FOR EACH ROW EXECUTE FUNCTION billing_issued_invoice_lines_are_final();
"""

BACKWARD = """
DROP TRIGGER IF EXISTS billing_invoiceline_issued_is_final ON billing_invoiceline;
DROP FUNCTION IF EXISTS billing_issued_invoice_lines_are_final();
DROP TRIGGER IF EXISTS billing_invoice_issued_is_final ON billing_invoice;
DROP FUNCTION IF EXISTS billing_issued_invoice_is_final();
"""


def _on_postgresql(sql):
    def run(apps, schema_editor):
        if schema_editor.connection.vendor == "postgresql":
            schema_editor.execute(sql, params=None)  # no placeholders: RAISE formats with %
    return run


class Migration(migrations.Migration):

    dependencies = [
        ("billing", "0004_periods_invoices"),
    ]

    operations = [
        migrations.RunPython(_on_postgresql(FORWARD), _on_postgresql(BACKWARD)),
    ]
