"""Reads of the model catalogue for the admin (the gateway reads it through its routing cache)."""
from django.db.models import QuerySet

from proxy.models import ModelRoute, PublicModel


def public_model_list() -> QuerySet[PublicModel]:
    """Public models with their aliases prefetched (one more query for a whole page)."""
    return PublicModel.objects.prefetch_related("aliases")


def model_route_list() -> QuerySet[ModelRoute]:
    """Routes with their model and upstream (a route's name is model → upstream:served_name)."""
    return ModelRoute.objects.select_related("model", "upstream")


def public_models_for_member(*, member) -> QuerySet[PublicModel]:
    """The model names a member may call: public models with a route, narrowed by Member.allowed_models
    when the member has any (the gateway's rule), by name; one query."""
    from django.db.models import Exists, OuterRef, Q

    allowed = member.allowed_models.through.objects.filter(member_id=member.pk)
    routed = ModelRoute.objects.filter(model=OuterRef("pk"))
    return (PublicModel.objects.filter(Exists(routed))
            .filter(~Exists(allowed) | Q(pk__in=allowed.values("publicmodel_id"))).order_by("name"))
