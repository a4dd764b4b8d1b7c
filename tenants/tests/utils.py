"""Helpers shared by the command and admin tests."""
import io

from django.core.management import call_command
from django.db import connection


def run_command(name: str, *args: str) -> tuple[str, str]:
    """Run a management command as the command line would; return (stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    call_command(name, *args, stdout=out, stderr=err)
    return out.getvalue(), err.getvalue()


def tables_containing(text: str) -> list[str]:
    """Return every table with a row whose text (all columns, cast to text) contains `text`."""
    found = []
    with connection.cursor() as cursor:
        for table in connection.introspection.table_names(cursor):
            quoted = connection.ops.quote_name(table)
            cursor.execute(f"SELECT count(*) FROM {quoted} AS t WHERE strpos(t::text, %s) > 0", [text])
            if cursor.fetchone()[0]:
                found.append(table)
    return found
