"""Writes for upstreams and the model catalogue (public models, their routes and aliases).

Admin, commands and (later) the API call these; never the hot path, which reads the
catalogue through its routing cache (QWENHUB_ROUTES_CACHE_SECONDS). Every change leaves
an AuditEvent naming the changed fields; an upstream's api_key only as "api_key changed".
"""
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from django.core.exceptions import ValidationError
from django.db import transaction

from proxy.models import ModelAlias, ModelRoute, PublicModel, Upstream
from tenants.models import AuditEvent, Member
from tenants.services.audit import audit_record, fields_apply, update_fields

UPSTREAM_EXISTS = "An upstream named {name!r} already exists."
ALIAS_TAKEN = "The name {alias!r} already belongs to model {model!r}."
MODEL_NAME_TAKEN = "The name {name!r} is already an alias of model {model!r}."
MODEL_IN_USE = ("Model {name!r} is in the allowed models of {count} member(s): take it out there first "
                "(a member with no allowed models may use every model).")

UPSTREAM_UPDATE_FIELDS = ("name", "base_url", "api_key", "enabled", "max_concurrency")
UPSTREAM_SECRET_FIELDS = ("api_key",)
PUBLIC_MODEL_UPDATE_FIELDS = ("name", "default_max_tokens", "max_model_len")
MODEL_ROUTE_UPDATE_FIELDS = ("model", "upstream", "served_name")
MODEL_ALIAS_UPDATE_FIELDS = ("alias", "model")

T = TypeVar("T")


@dataclass(frozen=True)
class RowChanges(Generic[T]):
    """Rows on a model's page (routes or aliases) to add, change and delete along with the model."""

    add: Sequence[Mapping[str, object]] = ()
    change: Sequence[tuple[T, Mapping[str, object]]] = ()
    delete: Sequence[T] = ()


# --- Upstreams ---------------------------------------------------------------------------

def _upstream_store(*, name: str, base_url: str, api_key: str, enabled: bool, max_concurrency: int) -> Upstream:
    if Upstream.objects.filter(name=name).exists():
        raise ValidationError(UPSTREAM_EXISTS.format(name=name))
    upstream = Upstream(name=name, base_url=base_url.rstrip("/"), api_key=api_key, enabled=enabled,
                        max_concurrency=max_concurrency)
    upstream.full_clean()
    upstream.save()
    return upstream


@transaction.atomic(durable=True)
def upstream_create(*, name: str, base_url: str, api_key: str = "", enabled: bool = True,
                    max_concurrency: int = 256, actor=None) -> Upstream:
    """Register an upstream serving nothing yet (routes are added on the model's page or with model_route_create)."""
    upstream = _upstream_store(name=name, base_url=base_url, api_key=api_key, enabled=enabled,
                               max_concurrency=max_concurrency)
    audit_record(kind=AuditEvent.Kind.UPSTREAM_ADDED, actor=actor, subject_id=upstream.pk,
                 data={"name": name, "base_url": upstream.base_url, "enabled": enabled,
                       "max_concurrency": max_concurrency, "api_key": "set" if api_key else "none"})
    return upstream


@transaction.atomic(durable=True)
def upstream_add(*, name: str, base_url: str, served_name: str, public_name: str | None = None,
                 aliases: list[str] | tuple = (), api_key: str = "", max_concurrency: int = 256,
                 actor=None) -> Upstream:
    """Register an upstream serving served_name, published as public_name (default: served_name).

    Adding a second upstream for a model that already exists makes it a replica of that model.
    """
    upstream = _upstream_store(name=name, base_url=base_url, api_key=api_key, enabled=True,
                               max_concurrency=max_concurrency)
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


@transaction.atomic(durable=True)
def upstream_update(*, upstream: Upstream, data: Mapping[str, object], actor=None, reason: str = "") -> Upstream:
    """Change an upstream's name, base URL, api_key, enabled flag or concurrency (UPSTREAM_UPDATE_FIELDS).

    The audit event names the changed fields with old and new values, except the api_key:
    "api_key changed", never its value. A call that changes nothing writes nothing.
    """
    locked = Upstream.objects.select_for_update(no_key=True).get(pk=upstream.pk)
    data = dict(data)
    if isinstance(data.get("base_url"), str):
        data["base_url"] = data["base_url"].rstrip("/")
    changes = fields_apply(instance=locked, data=data, fields=UPSTREAM_UPDATE_FIELDS,
                           secret_fields=UPSTREAM_SECRET_FIELDS)
    if not changes:
        return locked
    locked.full_clean(validate_unique="name" in changes, validate_constraints=False)
    locked.save(update_fields=update_fields(changes, locked))
    audit_record(kind=AuditEvent.Kind.UPSTREAM_UPDATED, actor=actor, subject_id=locked.pk, reason=reason,
                 data={"name": locked.name, "changed": changes})
    return locked


@transaction.atomic(durable=True)
def upstream_delete(*, upstream: Upstream, actor=None, reason: str = "") -> None:
    """Remove an upstream and its routes (the models and their aliases stay)."""
    routes = [f"{r.model.name} → {r.served_name}"
              for r in ModelRoute.objects.select_related("model").filter(upstream=upstream).order_by("pk")]
    pk, name = upstream.pk, upstream.name
    Upstream.objects.filter(pk=pk).delete()
    audit_record(kind=AuditEvent.Kind.UPSTREAM_DELETED, actor=actor, subject_id=pk, reason=reason,
                 data={"name": name, "base_url": upstream.base_url, "routes": routes})


# --- Public models -------------------------------------------------------------------------

def _model_name_check(name: str) -> None:
    alias = ModelAlias.objects.select_related("model").filter(alias=name).first()
    if alias is not None:
        raise ValidationError({"name": MODEL_NAME_TAKEN.format(name=name, model=alias.model.name)})


def _rows_apply(*, model: PublicModel, routes: RowChanges, aliases: RowChanges, actor) -> None:
    # Deletions first, so a page that renames one alias and re-adds the old name (or swaps a
    # route to another upstream) does not trip over the rows it is removing.
    for alias in aliases.delete:
        _model_alias_delete(alias=alias, actor=actor)
    for route in routes.delete:
        _model_route_delete(route=route, actor=actor)
    for alias, data in aliases.change:
        _model_alias_change(alias=alias, data=data, actor=actor)
    for route, data in routes.change:
        _model_route_change(route=route, data=data, actor=actor)
    for data in aliases.add:
        _model_alias_store(model=model, alias=data["alias"], actor=actor)
    for data in routes.add:
        _model_route_store(model=model, upstream=data["upstream"], served_name=data["served_name"], actor=actor)


@transaction.atomic(durable=True)
def public_model_create(*, name: str, default_max_tokens: int = 4096, max_model_len: int = 32768,
                        routes: Sequence[Mapping[str, object]] = (), aliases: Sequence[str] = (),
                        actor=None) -> PublicModel:
    """Publish a model name, optionally with its routes ({"upstream", "served_name"}) and aliases."""
    _model_name_check(name)
    model = PublicModel(name=name, default_max_tokens=default_max_tokens, max_model_len=max_model_len)
    model.full_clean()
    model.save()
    audit_record(kind=AuditEvent.Kind.MODEL_ADDED, actor=actor, subject_id=model.pk,
                 data={"name": name, "default_max_tokens": default_max_tokens, "max_model_len": max_model_len})
    _rows_apply(model=model, routes=RowChanges(add=routes), aliases=RowChanges(add=[{"alias": a} for a in aliases]),
                actor=actor)
    return model


@transaction.atomic(durable=True)
def public_model_update(*, model: PublicModel, data: Mapping[str, object], routes: RowChanges = RowChanges(),
                        aliases: RowChanges = RowChanges(), actor=None, reason: str = "") -> PublicModel:
    """Change a model's fields (PUBLIC_MODEL_UPDATE_FIELDS) and its routes and aliases, in one transaction.

    MODEL_UPDATED names the changed fields; each route or alias added, changed or removed has
    its own event. A call that changes nothing writes nothing.
    """
    locked = PublicModel.objects.select_for_update(no_key=True).get(pk=model.pk)
    for route in routes.delete:
        if route.model_id != locked.pk:
            raise ValueError(f"{route} is not a route of {locked}")
    for alias in aliases.delete:
        if alias.model_id != locked.pk:
            raise ValueError(f"{alias} is not an alias of {locked}")
    changes = fields_apply(instance=locked, data=data, fields=PUBLIC_MODEL_UPDATE_FIELDS)
    # Aliases go before the model's own name, which may take over one of them.
    for alias in aliases.delete:
        _model_alias_delete(alias=alias, actor=actor)
    if changes:
        if "name" in changes:
            _model_name_check(locked.name)
        locked.full_clean(validate_unique="name" in changes, validate_constraints=False)
        locked.save(update_fields=update_fields(changes, locked))
        audit_record(kind=AuditEvent.Kind.MODEL_UPDATED, actor=actor, subject_id=locked.pk, reason=reason,
                     data={"name": locked.name, "changed": changes})
    _rows_apply(model=locked, routes=routes, aliases=RowChanges(add=aliases.add, change=aliases.change),
                actor=actor)
    return locked


@transaction.atomic(durable=True)
def public_model_delete(*, model: PublicModel, actor=None, reason: str = "") -> None:
    """Remove a model name with its routes and aliases.

    Refused while a member's allowed models name it: removing it from a member's only
    allowed model would leave that member free to use every model.
    """
    count = Member.allowed_models.through.objects.filter(publicmodel_id=model.pk).count()
    if count:
        raise ValidationError(MODEL_IN_USE.format(name=model.name, count=count))
    aliases = sorted(ModelAlias.objects.filter(model=model).values_list("alias", flat=True))
    routes = [f"{r.upstream.name}:{r.served_name}"
              for r in ModelRoute.objects.select_related("upstream").filter(model=model).order_by("pk")]
    pk, name = model.pk, model.name
    PublicModel.objects.filter(pk=pk).delete()
    audit_record(kind=AuditEvent.Kind.MODEL_DELETED, actor=actor, subject_id=pk, reason=reason,
                 data={"name": name, "aliases": aliases, "routes": routes})


# --- Routes ----------------------------------------------------------------------------------

def _route_audit_data(route: ModelRoute) -> dict:
    return {"model": route.model.name, "upstream": route.upstream.name, "served_name": route.served_name}


def _model_route_store(*, model: PublicModel, upstream: Upstream, served_name: str, actor) -> ModelRoute:
    route = ModelRoute(model=model, upstream=upstream, served_name=served_name)
    route.full_clean()
    route.save()
    audit_record(kind=AuditEvent.Kind.ROUTE_ADDED, actor=actor, subject_id=route.pk, data=_route_audit_data(route))
    return route


def _model_route_change(*, route: ModelRoute, data: Mapping[str, object], actor, reason: str = "") -> ModelRoute:
    locked = ModelRoute.objects.select_for_update(no_key=True, of=("self",)).select_related(
        "model", "upstream").get(pk=route.pk)
    changes = fields_apply(instance=locked, data=data, fields=MODEL_ROUTE_UPDATE_FIELDS)
    if changes:
        locked.full_clean(exclude=[f for f in ("model", "upstream") if f not in changes],
                          validate_unique=False, validate_constraints=False)
        if "model" in changes or "upstream" in changes:
            locked.validate_constraints()  # one route per (model, upstream)
        locked.save(update_fields=update_fields(changes, locked))
        audit_record(kind=AuditEvent.Kind.ROUTE_UPDATED, actor=actor, subject_id=locked.pk, reason=reason,
                     data={**_route_audit_data(locked), "changed": changes})
    return locked


def _model_route_delete(*, route: ModelRoute, actor, reason: str = "") -> None:
    pk = route.pk
    data = _route_audit_data(ModelRoute.objects.select_related("model", "upstream").get(pk=pk))
    ModelRoute.objects.filter(pk=pk).delete()
    audit_record(kind=AuditEvent.Kind.ROUTE_DELETED, actor=actor, subject_id=pk, reason=reason, data=data)


@transaction.atomic(durable=True)
def model_route_create(*, model: PublicModel, upstream: Upstream, served_name: str, actor=None) -> ModelRoute:
    """Serve model from upstream under served_name (vLLM's --served-model-name): one more replica."""
    return _model_route_store(model=model, upstream=upstream, served_name=served_name, actor=actor)


@transaction.atomic(durable=True)
def model_route_update(*, route: ModelRoute, data: Mapping[str, object], actor=None, reason: str = "") -> ModelRoute:
    """Change a route's model, upstream or served name (MODEL_ROUTE_UPDATE_FIELDS)."""
    return _model_route_change(route=route, data=data, actor=actor, reason=reason)


@transaction.atomic(durable=True)
def model_route_delete(*, route: ModelRoute, actor=None, reason: str = "") -> None:
    _model_route_delete(route=route, actor=actor, reason=reason)


# --- Aliases -----------------------------------------------------------------------------------

def _alias_check(*, alias: str, exclude_pk: int | None = None) -> None:
    taken = ModelAlias.objects.select_related("model").filter(alias=alias).exclude(pk=exclude_pk).first()
    if taken is not None:
        raise ValidationError({"alias": ALIAS_TAKEN.format(alias=alias, model=taken.model.name)})
    if PublicModel.objects.filter(name=alias).exists():
        raise ValidationError({"alias": ALIAS_TAKEN.format(alias=alias, model=alias)})


def _model_alias_store(*, model: PublicModel, alias: str, actor) -> ModelAlias:
    _alias_check(alias=alias)
    row = ModelAlias(alias=alias, model=model)
    row.full_clean(exclude=["model"], validate_unique=False)  # uniqueness: _alias_check
    row.save()
    audit_record(kind=AuditEvent.Kind.ALIAS_ADDED, actor=actor, subject_id=row.pk,
                 data={"alias": alias, "model": model.name})
    return row


def _model_alias_change(*, alias: ModelAlias, data: Mapping[str, object], actor, reason: str = "") -> ModelAlias:
    locked = ModelAlias.objects.select_for_update(no_key=True, of=("self",)).select_related("model").get(pk=alias.pk)
    changes = fields_apply(instance=locked, data=data, fields=MODEL_ALIAS_UPDATE_FIELDS)
    if changes:
        if "alias" in changes:
            _alias_check(alias=locked.alias, exclude_pk=locked.pk)
        locked.full_clean(exclude=[] if "model" in changes else ["model"], validate_unique=False)
        locked.save(update_fields=list(changes))
        audit_record(kind=AuditEvent.Kind.ALIAS_UPDATED, actor=actor, subject_id=locked.pk, reason=reason,
                     data={"alias": locked.alias, "model": locked.model.name, "changed": changes})
    return locked


def _model_alias_delete(*, alias: ModelAlias, actor, reason: str = "") -> None:
    pk = alias.pk
    stored = ModelAlias.objects.select_related("model").get(pk=pk)  # as stored, not as a form left it
    data = {"alias": stored.alias, "model": stored.model.name}
    ModelAlias.objects.filter(pk=pk).delete()
    audit_record(kind=AuditEvent.Kind.ALIAS_DELETED, actor=actor, subject_id=pk, reason=reason, data=data)


@transaction.atomic(durable=True)
def model_alias_create(*, model: PublicModel, alias: str, actor=None) -> ModelAlias:
    """Let members call model by another name (refused if the name is taken by a model or alias)."""
    return _model_alias_store(model=model, alias=alias, actor=actor)


@transaction.atomic(durable=True)
def model_alias_update(*, alias: ModelAlias, data: Mapping[str, object], actor=None, reason: str = "") -> ModelAlias:
    """Rename an alias or point it at another model (MODEL_ALIAS_UPDATE_FIELDS)."""
    return _model_alias_change(alias=alias, data=data, actor=actor, reason=reason)


@transaction.atomic(durable=True)
def model_alias_delete(*, alias: ModelAlias, actor=None, reason: str = "") -> None:
    _model_alias_delete(alias=alias, actor=actor, reason=reason)
