"""Reads of the model catalogue for the admin (the gateway reads it through its routing cache)."""
from django.db.models import QuerySet

from proxy.models import ModelRoute, PublicModel


def public_model_list() -> QuerySet[PublicModel]:
    """Public models with their aliases prefetched (one more query for a whole page)."""
    return PublicModel.objects.prefetch_related("aliases")


def model_route_list() -> QuerySet[ModelRoute]:
    """Routes with their model and upstream (a route's name is model → upstream:served_name)."""
    return ModelRoute.objects.select_related("model", "upstream")
