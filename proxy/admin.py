"""Admin for upstreams and model names. The upstream's api_key is write-only here.

Every write goes through proxy.services (audited; the api_key only as "api_key changed"),
every list through proxy.selectors.
"""
from django import forms
from django.contrib import admin

from proxy.models import ModelAlias, ModelRoute, PublicModel, Upstream
from proxy.selectors import model_route_list, public_model_list
from proxy.services import (
    MODEL_ALIAS_UPDATE_FIELDS,
    MODEL_ROUTE_UPDATE_FIELDS,
    PUBLIC_MODEL_UPDATE_FIELDS,
    UPSTREAM_UPDATE_FIELDS,
    RowChanges,
    model_alias_create,
    model_alias_delete,
    model_alias_update,
    model_route_create,
    model_route_delete,
    model_route_update,
    public_model_create,
    public_model_delete,
    public_model_update,
    upstream_create,
    upstream_delete,
    upstream_update,
)
from qwenhub.admin import (
    RowServicesAdminMixin, SecretLookupsRefusedMixin, ServiceAdminMixin, adopt, form_data, inline_changes,
)

MASK = "••••••••"


class SecretField(forms.CharField):
    """A password-style field: the stored value is never rendered, and empty input keeps it."""

    widget = forms.PasswordInput(render_value=False)

    def has_changed(self, initial, data):
        return bool(data)


class UpstreamForm(forms.ModelForm):
    api_key = SecretField(required=False, max_length=500, label="API key",
                          help_text="vLLM's --api-key. Leave empty to keep the current one.")
    clear_api_key = forms.BooleanField(required=False, label="Remove the API key")

    class Meta:
        model = Upstream
        fields = ["name", "base_url", "api_key", "enabled", "max_concurrency"]

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.initial.pop("api_key", None)  # never sent back to the browser, not even by accident

    def clean(self):
        data = super().clean()
        if data.get("clear_api_key"):
            data["api_key"] = ""
        elif not data.get("api_key"):
            data["api_key"] = self.instance.api_key  # "" for a new upstream
        return data


def masked(value: str) -> str:
    return MASK if value else "—"


@admin.register(Upstream)
class UpstreamAdmin(RowServicesAdminMixin, SecretLookupsRefusedMixin, admin.ModelAdmin):
    form = UpstreamForm
    refused_lookup_parts = SecretLookupsRefusedMixin.refused_lookup_parts | {"api_key"}
    list_display = ["name", "base_url", "api_key_masked", "enabled", "max_concurrency", "created_at"]
    list_filter = ["enabled"]
    search_fields = ["name", "base_url"]  # never api_key
    list_select_related = True
    readonly_fields = ["api_key_masked", "created_at", "updated_at"]

    def get_fields(self, request, obj=None):
        if obj is not None and not self.has_change_permission(request, obj):
            # The read-only view would print every field's value, so leave the key out.
            return ["name", "base_url", "api_key_masked", "enabled", "max_concurrency", "created_at", "updated_at"]
        return ["name", "base_url", "api_key_masked", "api_key", "clear_api_key", "enabled", "max_concurrency",
                "created_at", "updated_at"]

    @admin.display(description="API key")
    def api_key_masked(self, upstream):
        return masked(upstream.api_key)

    service_fields, service_row = UPSTREAM_UPDATE_FIELDS, "upstream"
    service_create, service_update = staticmethod(upstream_create), staticmethod(upstream_update)
    service_delete = staticmethod(upstream_delete)


class ModelAliasInline(admin.TabularInline):
    model = ModelAlias
    extra = 0


class ModelRouteInline(admin.TabularInline):
    model = ModelRoute
    extra = 0
    fields = ["upstream", "served_name"]

    def get_queryset(self, request):
        return model_route_list()


@admin.register(PublicModel)
class PublicModelAdmin(ServiceAdminMixin, admin.ModelAdmin):
    """Saved through public_model_create / public_model_update, the routes and aliases inline in the same step."""

    list_display = ["name", "alias_list", "default_max_tokens", "max_model_len", "created_at"]
    search_fields = ["name", "aliases__alias"]
    list_select_related = True
    inlines = [ModelRouteInline, ModelAliasInline]

    def get_queryset(self, request):
        return public_model_list()

    @admin.display(description="aliases")
    def alias_list(self, model):
        return ", ".join(sorted(a.alias for a in model.aliases.all())) or "—"

    def save_with_services(self, request, form, formsets, change):
        rows = {}
        for formset in formsets:
            fields = MODEL_ROUTE_UPDATE_FIELDS if formset.model is ModelRoute else MODEL_ALIAS_UPDATE_FIELDS
            rows[formset.model] = inline_changes(formset, form.instance, fields)
        routes = RowChanges(*rows.get(ModelRoute, ((), (), ())))
        aliases = RowChanges(*rows.get(ModelAlias, ((), (), ())))
        data = form_data(form, PUBLIC_MODEL_UPDATE_FIELDS)
        if change:
            model = public_model_update(model=form.instance, data=data, routes=routes, aliases=aliases,
                                        actor=request.user)
        else:
            model = public_model_create(**data, routes=routes.add, aliases=[a["alias"] for a in aliases.add],
                                        actor=request.user)
        adopt(form.instance, model)

    def delete_with_service(self, request, obj):
        public_model_delete(model=obj, actor=request.user)


@admin.register(ModelRoute)
class ModelRouteAdmin(RowServicesAdminMixin, admin.ModelAdmin):
    list_display = ["model", "upstream", "served_name", "created_at"]
    list_filter = ["upstream"]
    search_fields = ["model__name", "served_name", "upstream__name"]
    list_select_related = ["model", "upstream"]

    service_fields, service_row = MODEL_ROUTE_UPDATE_FIELDS, "route"
    service_create, service_update = staticmethod(model_route_create), staticmethod(model_route_update)
    service_delete = staticmethod(model_route_delete)


@admin.register(ModelAlias)
class ModelAliasAdmin(RowServicesAdminMixin, admin.ModelAdmin):
    list_display = ["alias", "model"]
    search_fields = ["alias", "model__name"]
    list_select_related = ["model"]

    service_fields, service_row = MODEL_ALIAS_UPDATE_FIELDS, "alias"
    service_create, service_update = staticmethod(model_alias_create), staticmethod(model_alias_update)
    service_delete = staticmethod(model_alias_delete)
