"""The API's JSON parser: DRF's, with nesting too deep for Python's decoder refused like any other bad JSON."""
from django.utils.translation import gettext_lazy as _
from rest_framework import exceptions, parsers

TOO_DEEP = _("JSON parse error: nested too deeply.")


class JSONParser(parsers.JSONParser):
    def parse(self, stream, media_type=None, parser_context=None):
        try:
            return super().parse(stream, media_type, parser_context)
        except RecursionError:  # "[" * 1000 is enough; DRF turns only ValueError into a 400
            raise exceptions.ParseError(TOO_DEEP) from None
