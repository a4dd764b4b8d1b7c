"""Keyset (cursor) pagination, newest first: a page never repeats or skips a row while rows are added.

The cursor is the last row's (timestamp, id), opaque to clients (base64): the next page
is the rows strictly older than it in (timestamp desc, id desc) order, so rows inserted
meanwhile (always newer) never shift the pages already being read.
"""
import base64
import binascii
from datetime import datetime, timezone

from django.db.models import Q
from django.utils.translation import gettext_lazy as _
from rest_framework import exceptions
from rest_framework.pagination import BasePagination
from rest_framework.response import Response
from rest_framework.utils.urls import replace_query_param

CURSOR_INVALID = _("Invalid cursor: use the `next` link of the previous page.")


class KeysetPagination(BasePagination):
    field = "started_at"  # a timestamp; ties broken by id, descending too
    page_size = 50
    max_page_size = 200
    cursor_query_param = "cursor"
    page_size_query_param = "page_size"

    def _decode(self, value: str) -> tuple[datetime, int]:
        try:
            when, _sep, pk = base64.urlsafe_b64decode(value.encode("ascii")).decode().partition("|")
            parsed = datetime.fromisoformat(when)
            if parsed.tzinfo is None:  # every cursor this API hands out has its offset
                raise ValueError(when)
            return parsed.astimezone(timezone.utc), int(pk)  # PostgreSQL takes offsets up to ±15:59 only
        except (ValueError, OverflowError, UnicodeError, binascii.Error):
            raise exceptions.ValidationError({self.cursor_query_param: [CURSOR_INVALID]}) from None

    @staticmethod
    def _encode(when: datetime, pk: int) -> str:
        return base64.urlsafe_b64encode(f"{when.isoformat()}|{pk}".encode()).decode("ascii")

    def _size(self, request) -> int:
        raw = request.query_params.get(self.page_size_query_param)
        if raw is None:
            return self.page_size
        # ASCII digits, few of them: "²" is a digit int() refuses, and 5000 digits exceed its limit
        if not (raw.isascii() and raw.isdigit() and len(raw) <= 6) or not 1 <= int(raw) <= self.max_page_size:
            raise exceptions.ValidationError(
                {self.page_size_query_param: [_("A whole number from 1 to %(max)d.") % {"max": self.max_page_size}]})
        return int(raw)

    def paginate_queryset(self, queryset, request, view=None):
        size = self._size(request)
        raw = request.query_params.get(self.cursor_query_param)
        if raw:
            when, pk = self._decode(raw)
            queryset = queryset.filter(Q(**{f"{self.field}__lt": when}) | Q(**{self.field: when, "pk__lt": pk}))
        rows = list(queryset.order_by(f"-{self.field}", "-pk")[: size + 1])
        self.request = request
        self.next_cursor = None
        if len(rows) > size:
            rows = rows[:size]
            last = rows[-1]
            self.next_cursor = self._encode(getattr(last, self.field), last.pk)
        return rows

    def get_next_link(self):
        if self.next_cursor is None:
            return None
        return replace_query_param(self.request.build_absolute_uri(), self.cursor_query_param, self.next_cursor)

    def get_paginated_response(self, data):
        return Response({"next": self.get_next_link(), "results": data})

    def get_paginated_response_schema(self, schema):
        return {"type": "object", "required": ["next", "results"], "properties": {
            "next": {"type": "string", "format": "uri", "nullable": True,
                     "description": "The next (older) page, or null on the last page."},
            "results": schema}}

    def get_schema_operation_parameters(self, view):
        return [
            {"name": self.cursor_query_param, "in": "query", "required": False, "schema": {"type": "string"},
             "description": "Opaque cursor from the previous page's `next` link."},
            {"name": self.page_size_query_param, "in": "query", "required": False,
             "schema": {"type": "integer", "minimum": 1, "maximum": self.max_page_size, "default": self.page_size},
             "description": "Rows per page."},
        ]


class AuditPagination(KeysetPagination):
    field = "created_at"
