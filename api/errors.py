"""One error shape for the whole API: {"error": {"type", "message", "fields"}}.

`type` is one of ERROR_TYPES; `fields` maps an input field to its messages (400 only,
else empty); a service's django ValidationError is a 400 like a serializer's.
"""
from django.core.exceptions import PermissionDenied, RequestDataTooBig
from django.core.exceptions import ValidationError as DjangoValidationError
from django.http import Http404
from django.utils.translation import gettext_lazy as _
from drf_spectacular.utils import OpenApiResponse
from drf_spectacular.utils import extend_schema
from rest_framework import exceptions, serializers
from rest_framework.permissions import AllowAny
from rest_framework.views import APIView
from rest_framework.views import exception_handler as drf_exception_handler

INVALID = _("The request is invalid: see fields.")
TOO_LARGE = _("The request body is too large.")


class RequestTooLarge(exceptions.APIException):
    status_code = 413
    default_detail = TOO_LARGE
    default_code = "request_too_large"

ERROR_TYPES = {
    400: "invalid_request",
    401: "authentication_required",
    403: "permission_denied",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    409: "conflict",
    413: "request_too_large",
    415: "unsupported_media_type",
    429: "rate_limited",
}


def _flatten(detail) -> list[str]:
    if isinstance(detail, dict):
        return [f"{k}: {m}" for k, v in detail.items() for m in _flatten(v)]
    if isinstance(detail, list):
        return [m for item in detail for m in _flatten(item)]
    return [str(detail)]


def _fields(detail) -> dict[str, list[str]]:
    if not isinstance(detail, dict):
        return {}
    return {str(name): _flatten(value) for name, value in detail.items() if name != "non_field_errors"}


def _django_validation(exc: DjangoValidationError) -> exceptions.ValidationError:
    if hasattr(exc, "error_dict"):
        return exceptions.ValidationError({k if k != "__all__" else "non_field_errors": v
                                           for k, v in exc.message_dict.items()})
    return exceptions.ValidationError({"non_field_errors": exc.messages})


def exception_handler(exc, context):
    if isinstance(exc, DjangoValidationError):
        exc = _django_validation(exc)
    elif isinstance(exc, Http404):
        exc = exceptions.NotFound()
    elif isinstance(exc, PermissionDenied):
        exc = exceptions.PermissionDenied()
    elif isinstance(exc, RequestDataTooBig):  # a body over DATA_UPLOAD_MAX_MEMORY_SIZE (else Django's HTML 400)
        exc = RequestTooLarge()
    response = drf_exception_handler(exc, context)
    if response is None:
        return None  # a 500: Django's handler logs it
    detail = exc.detail if isinstance(exc, exceptions.APIException) else response.data
    if isinstance(exc, exceptions.ValidationError):
        fields = _fields(detail)
        general = detail.get("non_field_errors") if isinstance(detail, dict) else detail
        message = " ".join(_flatten(general)) if general else str(INVALID)
    else:
        fields, message = {}, " ".join(_flatten(detail))
    response.data = {"error": {"type": ERROR_TYPES.get(response.status_code, "error"), "message": message,
                               "fields": fields}}
    return response


# --- the schema of the error shape ------------------------------------------------------

class ErrorBodySerializer(serializers.Serializer):
    type = serializers.ChoiceField(choices=sorted(set(ERROR_TYPES.values())))
    message = serializers.CharField()
    fields = serializers.DictField(child=serializers.ListField(child=serializers.CharField()),
                                   help_text="Input field → its messages (400 only; else empty).")


class ErrorSerializer(serializers.Serializer):
    error = ErrorBodySerializer()


def error(description: str) -> OpenApiResponse:
    return OpenApiResponse(ErrorSerializer, description=description)


AUTH_ERRORS = {
    401: error("No credentials, or an invalid, revoked or expired key, or a suspended membership."),
    429: error("Too many requests from this user (QWENHUB_API_RATE)."),
}
MEMBER_ERRORS = {**AUTH_ERRORS, 400: error("Invalid input: `fields` says which.")}
ADMIN_ERRORS = {**MEMBER_ERRORS,
                403: error("Signed in, but not an admin of this team."),
                404: error("No such team (or object) among yours.")}
OBJECT_ERRORS = {**MEMBER_ERRORS, 404: error("No such object among yours.")}


@extend_schema(exclude=True)
class NotFoundApi(APIView):
    """Any other path under the API: a 404 in the API's error shape (not Django's HTML page)."""

    permission_classes = [AllowAny]
    authentication_classes = []
    throttle_classes = []

    def http_method_not_allowed(self, request, *args, **kwargs):
        raise exceptions.NotFound()

    def get(self, request, *args, **kwargs):
        raise exceptions.NotFound()

    post = put = patch = delete = get
