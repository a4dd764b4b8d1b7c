"""Writes for upstreams and model routes (admin and commands; never the hot path)."""
from django.core.exceptions import ValidationError
from django.db import transaction

from proxy.models import ModelAlias, ModelRoute, PublicModel, Upstream
from tenants.models import AuditEvent

UPSTREAM_EXISTS = "An upstream named {name!r} already exists."
ALIAS_TAKEN = "The name {alias!r} already belongs to model {model!r}."


@transaction.atomic(durable=True)
def upstream_add(*, name: str, base_url: str, served_name: str, public_name: str | None = None,
                 aliases: list[str] | tuple = (), api_key: str = "", max_concurrency: int = 256,
                 actor=None) -> Upstream:
    """Register an upstream serving served_name, published as public_name (default: served_name).

    Adding a second upstream for a model that already exists makes it a replica of that model.
    """
    if Upstream.objects.filter(name=name).exists():
        raise ValidationError(UPSTREAM_EXISTS.format(name=name))
    upstream = Upstream(name=name, base_url=base_url.rstrip("/"), api_key=api_key, max_concurrency=max_concurrency)
    upstream.full_clean()
    upstream.save()
    public_name = public_name or served_name
    alias = ModelAlias.objects.select_related("model").filter(alias=public_name).first()
    model = alias.model if alias else PublicModel.objects.get_or_create(name=public_name)[0]
    route = ModelRoute(model=model, upstream=upstream, served_name=served_name)
    route.full_clean()
    route.save()
    for name_ in dict.fromkeys(a for a in aliases if a and a != model.name):
        taken = ModelAlias.objects.select_related("model").filter(alias=name_).first()
        if taken and taken.model_id != model.pk:
            raise ValidationError(ALIAS_TAKEN.format(alias=name_, model=taken.model.name))
        if PublicModel.objects.filter(name=name_).exclude(pk=model.pk).exists():
            raise ValidationError(ALIAS_TAKEN.format(alias=name_, model=name_))
        if not taken:
            ModelAlias.objects.create(alias=name_, model=model)
    AuditEvent.objects.create(kind=AuditEvent.Kind.UPSTREAM_ADDED, actor=actor, subject_id=upstream.pk,
                              data={"name": name, "base_url": upstream.base_url, "model": model.name})
    return upstream
