"""The member's own page: this month's quota, their keys and what admins changed, with who and why."""
from django.contrib.auth.decorators import login_required
from django.shortcuts import render
from django.utils import timezone

from tenants.selectors import member_history, member_keys, member_quota_this_month, memberships_for_user


@login_required
def member_home(request):
    accounts = [
        {"member": m, "quota": member_quota_this_month(member=m), "keys": list(member_keys(member=m)),
         "history": list(member_history(member=m))}
        for m in memberships_for_user(user=request.user)
    ]
    return render(request, "tenants/member_home.html", {"accounts": accounts, "now": timezone.now()})
