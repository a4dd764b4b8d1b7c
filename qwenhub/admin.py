"""Admin building blocks shared by the apps: read-only rows, refused secret lookups, writes through services."""
import copy

from django import forms
from django.contrib import messages
from django.contrib.admin.options import csrf_protect_m
from django.core.exceptions import ValidationError
from django.contrib.admin import helpers
from django.http import HttpResponseRedirect
from django.template.response import TemplateResponse


class ReadOnlyAdminMixin:
    """Rows the admin may look at but never add, change or delete (money, usage, audit)."""

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False


class SecretLookupsRefusedMixin:
    """Refuse URL lookups (?field=…) on secrets, as django.contrib.auth's UserAdmin does for passwords."""

    refused_lookup_parts = frozenset({"key_hash", "password"})

    def lookup_allowed(self, lookup, value, request=None):
        if self.refused_lookup_parts.intersection(lookup.split("__")):
            return False
        return super().lookup_allowed(lookup, value, request)


# --- Writes through services ---------------------------------------------------------------

class ServiceRefused(Exception):
    """A service raised ValidationError while the admin was saving or deleting."""

    def __init__(self, error: ValidationError) -> None:
        super().__init__(error)
        self.error = error


def _messages(error: ValidationError) -> list[tuple[str | None, list[str]]]:
    if hasattr(error, "error_dict"):
        return [(None if field == "__all__" else field, ValidationError(errors).messages)
                for field, errors in error.error_dict.items()]
    return [(None, error.messages)]


def _add_refusal(form: forms.BaseForm, error: ValidationError) -> None:
    for field, msgs in _messages(error):
        if field is not None and field in form.fields:
            form.add_error(field, msgs)
        else:
            form.add_error(None, [f"{field}: {m}" if field else m for m in msgs])


def form_data(form: forms.BaseForm, fields) -> dict:
    """The form's cleaned values of the given fields (the service works out which changed)."""
    return {f: form.cleaned_data[f] for f in fields if f in form.cleaned_data}


def adopt(instance, saved) -> None:
    """Make the admin's unsaved form instance the row a service saved (the admin redirects and logs with it)."""
    for field in saved._meta.concrete_fields:
        setattr(instance, field.attname, getattr(saved, field.attname))
    instance._state.adding, instance._state.db = False, saved._state.db


def inline_changes(formset, parent, fields):
    """Read a validated inline formset as (rows to add, rows to change, rows to delete).

    Also sets new_objects/changed_objects/deleted_objects, which the admin's change message reads
    (formset.save(), which would set them, is never called: the service writes the rows).
    """
    fields = [f for f in fields if f != formset.fk.name]  # the parent is the page's object, not an edit
    to_delete = set(formset.deleted_forms)
    added, changed, deleted = [], [], []
    formset.new_objects, formset.changed_objects, formset.deleted_objects = [], [], []
    for form in formset.initial_forms:
        if form.instance.pk is None:
            continue
        if form in to_delete:
            deleted.append(form.instance)
            formset.deleted_objects.append(form.instance)
        elif form.has_changed():
            changed.append((form.instance, form_data(form, fields)))
            formset.changed_objects.append((form.instance, form.changed_data))
    for form in formset.extra_forms:
        if not form.has_changed() or form in to_delete:
            continue
        added.append(form_data(form, fields))
        setattr(form.instance, formset.fk.name, parent)
        formset.new_objects.append(form.instance)
    return added, changed, deleted


class ServiceAdminMixin:
    """An admin whose writes are services: subclasses implement save_with_services (and delete_with_service).

    Services open their own durable transaction, so the add, change and delete views are not
    wrapped in the admin's usual one. A ValidationError from a service while saving shows on
    the form (the POST is validated again with the service's errors added, so nothing is
    saved); while deleting, as an error message. The admin's LogEntry is written after the
    service succeeded.
    """

    # Django's changeform_view and delete_view are these same bodies (_changeform_view,
    # _delete_view) inside transaction.atomic(), in which a durable service cannot run.
    @csrf_protect_m
    def changeform_view(self, request, object_id=None, form_url="", extra_context=None):
        try:
            return self._changeform_view(request, object_id, form_url, extra_context)
        except ServiceRefused as refused:
            request._service_refusal = refused.error
            return self._changeform_view(request, object_id, form_url, extra_context)

    def get_form(self, request, obj=None, change=False, **kwargs):
        form_class = super().get_form(request, obj, change, **kwargs)
        refusal = getattr(request, "_service_refusal", None)
        if refusal is None:
            return form_class

        class RefusedForm(form_class):
            def clean(self):
                data = super().clean()
                _add_refusal(self, refusal)
                return data

        return RefusedForm

    def save_model(self, request, obj, form, change):
        pass  # save_related does the whole save, with the inlines, through the services

    def save_related(self, request, form, formsets, change):
        try:
            self.save_with_services(request, form, formsets, change)
        except ValidationError as exc:
            raise ServiceRefused(exc) from exc

    def save_with_services(self, request, form, formsets, change) -> None:
        raise NotImplementedError

    def delete_with_service(self, request, obj) -> None:
        raise NotImplementedError

    @csrf_protect_m
    def delete_view(self, request, object_id, extra_context=None):
        try:
            return self._delete_view(request, object_id, extra_context)
        except ServiceRefused as refused:
            self.message_user(request, " ".join(refused.error.messages), messages.ERROR)
            return HttpResponseRedirect(request.path)

    def log_deletions(self, request, queryset):
        return []  # logged by delete_model, once the service has deleted the row

    def delete_model(self, request, obj):
        logged = copy.copy(obj)  # keeps the pk the log needs
        try:
            self.delete_with_service(request, obj)
        except ValidationError as exc:
            raise ServiceRefused(exc) from exc
        super().log_deletions(request, [logged])

    def delete_queryset(self, request, queryset):
        for obj in queryset:
            try:
                self.delete_model(request, obj)
            except ServiceRefused as refused:
                self.message_user(request, f"{obj}: {' '.join(refused.error.messages)}", messages.ERROR)


# --- Teams and members ------------------------------------------------------------------------


class RowServicesAdminMixin(ServiceAdminMixin):
    """A row's admin whose writes are three services (set as staticmethods on the subclass):

    ``service_create(**data, actor=)``, ``service_update(<service_row>=row, data=, actor=)`` and
    ``service_delete(<service_row>=row, actor=)``; ``service_fields`` are the form's fields passed
    as data.
    """

    service_fields: tuple = ()
    service_row = ""

    def save_with_services(self, request, form, formsets, change):
        data = form_data(form, self.service_fields)
        if change:
            saved = self.service_update(**{self.service_row: form.instance}, data=data, actor=request.user)
        else:
            saved = self.service_create(**data, actor=request.user)
        adopt(form.instance, saved)

    def delete_with_service(self, request, obj):
        self.service_delete(**{self.service_row: obj}, actor=request.user)


ACTION_FORM_TEMPLATE = "admin/action_form.html"


def action_form_response(modeladmin, request, *, title: str, intro: str, objects, form, selected, action: str):
    """The page an admin action shows to ask for its input (amount, reason…) before it runs."""
    context = {
        **modeladmin.admin_site.each_context(request),
        "title": title, "intro": intro, "opts": modeladmin.model._meta, "form": form, "objects": objects,
        "selected": list(selected), "action": action, "action_checkbox_name": helpers.ACTION_CHECKBOX_NAME,
    }
    return TemplateResponse(request, ACTION_FORM_TEMPLATE, context)


def each_through_service(modeladmin, request, rows, call, *, logged: str, done: str,
                         refused_level=messages.ERROR) -> int:
    """An admin action: call(row) for each row; a refusal is a message, a success a LogEntry.

    `done` is formatted with the number of successes ({n}) and shown if there were any.
    """
    n = 0
    for row in rows:
        try:
            call(row)
        except ValidationError as exc:
            modeladmin.message_user(request, " ".join(exc.messages), refused_level)
            continue
        modeladmin.log_change(request, row, logged)
        n += 1
    if n:
        modeladmin.message_user(request, done.format(n=n), messages.SUCCESS)
    return n
