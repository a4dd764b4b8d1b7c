"""The OpenAPI schema's component names: a view's nested InputSerializer/OutputSerializer is named after it.

ApiKeyCreateApi.OutputSerializer → "ApiKeyCreateOutput" (plain `get_serializer_name`
would call every one of them "Output").
"""
from drf_spectacular.openapi import AutoSchema as BaseAutoSchema


class AutoSchema(BaseAutoSchema):
    def get_serializer_name(self, serializer, direction):
        qualname = type(serializer).__qualname__
        if "." in qualname:
            outer, inner = qualname.split(".")[-2:]
            return outer.removesuffix("Api") + inner.removesuffix("Serializer")
        return super().get_serializer_name(serializer, direction)
