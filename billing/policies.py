"""Allocation policies: how a team's month cost is split among its members (pure code, no database).

WARNING: changing a policy changes invoices. A closed period records the policy and its
parameters, so a recompute of an old month must use them, not today's.

Every policy takes the month's total (already rounded to the currency's minor unit) and one
`MemberMonth` per member (usage aggregated in SQL, the period's quota, active days), and
returns a `Split` whose amounts sum exactly to what it allocates (largest remainder,
billing.money.allocate):

- ``usage``: by weighted tokens, prompt × prompt_weight + completion × completion_weight,
  times an optional per-model weight;
- ``quota``: by each member's monthly quota (``quota_unit`` tokens or requests); a member with
  an unlimited quota weighs as the largest finite quota of the team;
- ``seed_rate``: a price per unit = total ÷ the sum of quotas; each member pays what they used
  at that price, and the part nobody used is idle capacity, charged to ``idle_payer_id`` or
  left unallocated;
- ``equal``: equal among the members active in the period;
- ``base_plus_usage``: ``base_share`` of the total split as ``equal``, the rest by ``usage``.

One rule for members who joined, left or were suspended mid-month: the **fixed parts**
(``equal`` and the base of ``base_plus_usage``) are pro rata by the days the member was
active in the period; usage-based parts follow usage, whenever it happened. When nobody used
anything, a usage-based policy falls back to ``equal`` and says so.
"""
from dataclasses import dataclass, field
from decimal import Decimal
from fractions import Fraction

from billing.money import PRICE_PLACES, ZERO, allocate, minor_unit, quantize

USAGE, QUOTA, SEED_RATE, EQUAL, BASE_PLUS_USAGE = "usage", "quota", "seed_rate", "equal", "base_plus_usage"
POLICIES = (USAGE, QUOTA, SEED_RATE, EQUAL, BASE_PLUS_USAGE)

EXPLAIN = {
    USAGE: "The month's cost is split by tokens used, prompt tokens weighted {prompt_weight} and completion "
           "tokens {completion_weight}{model_note}.",
    QUOTA: "The month's cost is split by each member's monthly {unit} quota.",
    SEED_RATE: "Each {unit_one} costs {price} {currency} (the month's cost divided by the team's total quota of "
               "{quota_sum} {unit}); the part nobody used ({idle} {currency}) is {idle_note}.",
    EQUAL: "The month's cost is split equally among the members active this month, pro rata by active days.",
    BASE_PLUS_USAGE: "{base_percent}% of the month's cost is split equally among the members active this month "
                     "(pro rata by active days), the rest by tokens used.",
}
FELL_BACK = "Nobody used the server this month, so the cost is split equally among the members active this month."
NOBODY_ACTIVE = "Nobody was a member this month: the cost is left unallocated."


@dataclass(frozen=True)
class ModelUsage:
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass(frozen=True)
class MemberMonth:
    """One member's month as the policies see it."""

    member_id: int
    by_model: dict[str, ModelUsage] = field(default_factory=dict)
    request_quota: int | None = None  # the period's limits; None = unlimited
    token_quota: int | None = None
    active_days: int = 1  # days of the period the member was active (fixed parts are pro rata)

    @property
    def requests(self) -> int:
        return sum(m.requests for m in self.by_model.values())

    @property
    def tokens(self) -> int:
        return sum(m.prompt_tokens + m.completion_tokens for m in self.by_model.values())


@dataclass(frozen=True)
class PolicyParams:
    kind: str = USAGE
    prompt_weight: Decimal = Decimal(1)
    completion_weight: Decimal = Decimal(1)
    model_weights: dict[str, Decimal] = field(default_factory=dict)  # model name → weight (default 1)
    base_share: Decimal = Decimal("0.5")  # base_plus_usage: the part split equally
    quota_unit: str = "tokens"  # quota and seed_rate: "tokens" or "requests"
    idle_payer_id: int | None = None  # seed_rate: who pays the idle capacity (None: unallocated)


@dataclass
class Split:
    amounts: dict[int, Decimal]  # member id → amount (the idle payer's includes the idle part)
    policy: str  # the policy applied (equal after a fallback)
    explanation: str
    idle: Decimal = ZERO  # seed_rate: cost of the capacity nobody used
    unallocated: Decimal = ZERO  # what no member pays
    fell_back: bool = False

    @property
    def allocated(self) -> Decimal:
        return sum(self.amounts.values(), ZERO)


IDLE = "idle"  # the key of seed_rate's unallocated idle capacity in a split's weights


def usage_weight(usage: ModelUsage, model: str, params: PolicyParams) -> Decimal:
    """The weighted tokens of one member's use of one model."""
    weight = params.model_weights.get(model, Decimal(1))
    return (usage.prompt_tokens * params.prompt_weight + usage.completion_tokens * params.completion_weight) * weight


def usage_weights(members: list[MemberMonth], params: PolicyParams) -> dict[int, Fraction]:
    return {m.member_id: Fraction(sum((usage_weight(u, name, params) for name, u in m.by_model.items()), ZERO))
            for m in members}


def _plain(number: Decimal) -> str:
    """A number for a sentence: 10, 0.25 (no exponent, no trailing zeros)."""
    return format(number.normalize(), "f")


def _normalised(weights: dict) -> dict:
    total = sum(weights.values(), Fraction(0))
    return {k: Fraction(w) / total for k, w in weights.items()} if total else {k: Fraction(0) for k in weights}


def _day_weights(members: list[MemberMonth]) -> dict[int, Fraction]:
    return {m.member_id: Fraction(max(0, m.active_days)) for m in members}


def _quota(member: MemberMonth, unit: str) -> int | None:
    return member.token_quota if unit == "tokens" else member.request_quota


def _used(member: MemberMonth, unit: str) -> int:
    return member.tokens if unit == "tokens" else member.requests


# Each policy returns (exact weights by member id, plus IDLE for a part left unallocated;
# the policy applied; its explanation, which may name {idle}), or None when nothing was used.
# split_cost allocates once, so every amount is within one minor unit of its exact share.

def _equal(total, members, params, currency):
    return _day_weights(members), EQUAL, EXPLAIN[EQUAL]


def _usage(total, members, params, currency):
    weights = usage_weights(members, params)
    if not any(weights.values()):
        return None
    note = " and by model" if params.model_weights else ""
    return weights, USAGE, EXPLAIN[USAGE].format(prompt_weight=params.prompt_weight,
                                                completion_weight=params.completion_weight, model_note=note)


def _quota_split(total, members, params, currency):
    unit = params.quota_unit
    largest = max((q for m in members if (q := _quota(m, unit)) is not None), default=0)
    weights = {m.member_id: Fraction(q if (q := _quota(m, unit)) is not None else largest) for m in members}
    if not any(weights.values()):
        return None
    return weights, QUOTA, EXPLAIN[QUOTA].format(unit=unit[:-1])


def _seed_rate(total, members, params, currency):
    unit = params.quota_unit
    quotas = [_quota(m, unit) for m in members]
    used = {m.member_id: Fraction(_used(m, unit)) for m in members}
    used_sum = sum(used.values(), Fraction(0))
    if None in quotas or not sum(quotas) or not used_sum:
        # No finite total quota to price by (or nothing used): by use, or the equal fallback.
        return _usage(total, members, PolicyParams(), currency)
    quota_sum = sum(quotas)
    if used_sum >= quota_sum:  # top-ups took the team to or past its total quota: everything is used
        weights, idle_share = _normalised(used), Fraction(0)
    else:
        weights, idle_share = {k: u / quota_sum for k, u in used.items()}, 1 - used_sum / quota_sum
    payer = params.idle_payer_id if params.idle_payer_id in weights else None
    if idle_share:
        weights[IDLE if payer is None else payer] = weights.get(payer, Fraction(0)) + idle_share
    price = _plain((total / quota_sum).quantize(Decimal(1).scaleb(-PRICE_PLACES)))
    explanation = EXPLAIN[SEED_RATE].format(
        unit_one=unit[:-1], price=price, currency=currency, quota_sum=quota_sum, unit=unit, idle="{idle}",
        idle_note="left unallocated" if payer is None else "charged to the team's designated payer")
    return weights, SEED_RATE, explanation


def _base_plus_usage(total, members, params, currency):
    usage = usage_weights(members, params)
    if not any(usage.values()):
        return None
    share = Fraction(params.base_share)
    days, usage = _normalised(_day_weights(members)), _normalised(usage)
    weights = {k: share * days[k] + (1 - share) * usage[k] for k in usage}
    percent = _plain(params.base_share * 100)
    return weights, BASE_PLUS_USAGE, EXPLAIN[BASE_PLUS_USAGE].format(base_percent=percent)


_POLICY = {USAGE: _usage, QUOTA: _quota_split, SEED_RATE: _seed_rate, EQUAL: _equal, BASE_PLUS_USAGE: _base_plus_usage}


def split_cost(total: Decimal, members: list[MemberMonth], params: PolicyParams, currency: str) -> Split:
    """Split the month's total among members under params; amounts plus unallocated sum to total."""
    if total != quantize(total, currency):
        raise ValueError(f"round the month's total to {minor_unit(currency)} {currency} first")
    if params.kind not in POLICIES:
        raise ValueError(f"unknown allocation policy {params.kind!r}")
    zero = ZERO * minor_unit(currency)
    planned = _POLICY[params.kind](total, members, params, currency)
    fell_back = planned is None
    weights, policy, explanation = (_day_weights(members), EQUAL, FELL_BACK) if fell_back else planned
    if not any(weights.values()):
        return Split({m.member_id: zero for m in members}, policy, NOBODY_ACTIVE, unallocated=total,
                     fell_back=fell_back)
    parts = allocate(total, weights, currency)
    unallocated = parts.pop(IDLE, zero)
    idle = unallocated
    if policy == SEED_RATE and params.idle_payer_id in parts:  # the payer's amount includes it
        idle = quantize(_idle_of(total, members, params), currency)
    return Split(parts, policy, explanation.replace("{idle}", str(idle)), idle=idle, unallocated=unallocated,
                 fell_back=fell_back)


def _idle_of(total: Decimal, members: list[MemberMonth], params: PolicyParams) -> Decimal:
    """The cost of the capacity nobody used, for the sentence and the admin summary."""
    quota_sum = sum(_quota(m, params.quota_unit) or 0 for m in members)
    used_sum = sum(_used(m, params.quota_unit) for m in members)
    return total * max(0, quota_sum - used_sum) / quota_sum if quota_sum else ZERO


def split_by_model(amount: Decimal, member: MemberMonth, params: PolicyParams, currency: str) -> dict[str, Decimal]:
    """Split one member's amount over the models they used (by weighted tokens); sums to amount."""
    weights = {name: usage_weight(u, name, params) for name, u in member.by_model.items()}
    if not any(weights.values()):
        weights = {name: Decimal(u.requests) for name, u in member.by_model.items()}
    if not any(weights.values()):
        return {}
    return allocate(amount, weights, currency)
