"""Budget windows, spend history and the block / alert decision (DESIGN §7). Pure.

Times are epoch milliseconds; the caller passes "now". Money is Decimal USD.

Windows
    A budget's window is found from the wall clock the caller passes, never from
    event times, and a call counts at the time the ledger received it (see
    `spend_time`): a producer's clock, fast, slow or forged, can neither start
    the next window early nor put spend in a window that has ended.
    - calendar (default): `Ns`/`Nm`/`Nh` are aligned to the Unix epoch in UTC;
      `Nd` to local midnights in the budget time zone, counted in blocks of N
      days from Monday 1970-01-05 (so `1d` is a day and `7d` a Monday-started
      week); `Nmo` to the 1st of the month at local midnight, in blocks of N
      months from January (so `3mo` is a calendar quarter). As in LiteLLM,
      `30d` is the calendar month (`1mo`) and `24h` the local day (`1d`).
    - sliding: the last N of time, moving by whole minutes: at time t the
      window is [m + 1min - N, m + 1min) with m = t floored to the minute.
    A window is half-open [start, end): an event exactly at `end` is in the next.

Spend history (per tag), in three tiers that never overlap:
    - second buckets that also hold the event ids counted in them, for the
      dedupe horizon; an id counted there is a duplicate whatever time its copy
      carries (a producer retrying an event without `occurred_at` stamps each
      copy with its own receive time);
    - minute buckets for `minute_history_ms`;
    - local-day buckets for `day_history_ms` (older spend is forgotten).
    A bucket moves to the coarser tier whole (all seconds of a minute, all
    minutes of a day), so a coarse bucket never overlaps a live finer one; on
    recovery a finer bucket that a coarser one covers is a leftover of an
    interrupted move and is dropped. An event too late to fall in the second
    tier is added straight to its minute or day bucket without an id check.

Decisions
    - alerts: each threshold (percent of `max_budget`, plus 100) fires once per
      calendar window; a budget created mid-window fires the thresholds already
      passed once; an update re-arms only the thresholds not already passed
      under the new budget; `soft_budget` alerts once per window and never
      blocks. A sliding window moves every minute, so a threshold fires when
      spend rises through it and re-arms only once spend has fallen REARM_POINTS
      below it (spend hovering at a threshold alerts once, not every minute).
    - projection (calendar windows with a max): spend at the window's rate so
      far, carried to the window's end. Once a tenth of the window has passed,
      a projection above `max_budget` alerts ("projected") once per window,
      while the budget is not yet blocked.
    - block: spend >= max_budget; it lifts when the window ends, when the budget
      is raised above the spend, or when it is deleted. For a sliding window the
      block's end is when enough spend has slid out to fall below the budget.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from datetime import UTC, date, datetime, timedelta, tzinfo
from decimal import ROUND_CEILING, Decimal, localcontext
from functools import lru_cache
from typing import Literal

from ledger.errors import BudgetError
from schemas.budgets import DEFAULT_ALERT_THRESHOLDS, BudgetDefinition, WindowMode

SECOND_MS = 1000
MINUTE_MS = 60_000
HOUR_MS = 3_600_000
DAY_MS = 86_400_000
ZERO = Decimal(0)

Unit = Literal["s", "m", "h", "d", "mo"]

_UNIT_MS: dict[str, int] = {"s": SECOND_MS, "m": MINUTE_MS, "h": HOUR_MS, "d": DAY_MS}
_DURATION_RE = re.compile(r"^\s*([0-9]{1,6})\s*(mo|s|m|h|d)\s*$", re.ASCII | re.IGNORECASE)
MAX_SPAN_MS = 366 * DAY_MS
MAX_MONTHS = 12
MAX_SLIDING_MS = 7 * DAY_MS
# Monday 1970-01-05: day windows of N days are counted from here, so 7d starts on Mondays.
_EPOCH_MONDAY = date(1970, 1, 5).toordinal()
# A sliding window's threshold re-arms once spend is this many percentage points below it.
REARM_POINTS = 10


def spend_time(occurred_ms: int, received_ms: int, now_ms: int | None = None) -> int:
    """When a call counts against budgets: when the ledger received it (never later than `now_ms`).
    `occurred_ms` is used only when the call carries no receive time of its own (0)."""
    at = received_ms or occurred_ms
    return min(at, now_ms) if now_ms is not None else at


def model_key(model: str) -> str:
    """The budget key of a model: `model:` and its last path segment, lower-cased, so `openai/gpt-4o`,
    `GPT-4o` and an OpenRouter `openai/gpt-4o` all count for `model:gpt-4o` (the SQL twin is
    `MODEL_KEY_SQL` in spendledger/restore.py)."""
    return "model:" + model.strip().rsplit("/", 1)[-1].lower()


def budget_keys(tags: Iterable[str], model: str, provider: str) -> list[str]:
    """The keys a call's spend counts for: its tags, `model:<model>` and `provider:<provider>` (the
    provider as the ledger names it, already normalized)."""
    keys = list(tags)
    for key in (model_key(model) if model.strip() else "", f"provider:{provider}" if provider else ""):
        if key and key not in keys:
            keys.append(key)
    return keys


@dataclass(frozen=True)
class Duration:
    count: int
    unit: Unit

    def __str__(self) -> str:
        return f"{self.count}{self.unit}"

    @property
    def ms(self) -> int | None:
        """Length in ms; None for months (their length varies)."""
        return None if self.unit == "mo" else self.count * _UNIT_MS[self.unit]


def parse_duration(text: str) -> Duration:
    """`30s`, `15m`, `1h`, `30d`, `1mo` -> Duration. Raises BudgetError with the rule broken."""
    match = _DURATION_RE.match(text or "")
    if not match:
        raise BudgetError(
            f"budget_duration {text!r} is not N followed by s, m, h, d or mo (e.g. '30d', '1mo')"
        )
    count, unit = int(match.group(1)), match.group(2)
    if unit == "M":
        raise BudgetError(f"budget_duration {text!r} is ambiguous: write 'm' for minutes or 'mo' for months")
    unit = unit.lower()
    if count < 1:
        raise BudgetError("budget_duration must be at least 1")
    if unit == "mo":
        if count > MAX_MONTHS or MAX_MONTHS % count:
            raise BudgetError(
                "month windows are 1, 2, 3, 4, 6 or 12 months (they divide the year from January)"
            )
        return Duration(count, "mo")
    span = count * _UNIT_MS[unit]
    if span > MAX_SPAN_MS:
        raise BudgetError("budget_duration is at most 366d")
    if unit == "s" and count >= 60 and count % 60:
        raise BudgetError("windows of a minute or more are whole minutes: write e.g. '2m', not '90s'")
    return Duration(count, unit)  # type: ignore[arg-type]


@dataclass(frozen=True, slots=True)
class Window:
    start_ms: int
    end_ms: int

    def contains(self, at_ms: int) -> bool:
        return self.start_ms <= at_ms < self.end_ms


def _local_midnight_ms(day: date, tz: tzinfo) -> int:
    return int(datetime(day.year, day.month, day.day, tzinfo=tz).timestamp() * 1000)


def local_date(at_ms: int, tz: tzinfo) -> date:
    return datetime.fromtimestamp(at_ms / 1000, tz=UTC).astimezone(tz).date()


def calendar_window(duration: Duration, at_ms: int, tz: tzinfo) -> Window:
    if duration.unit in ("s", "m", "h"):
        size = duration.count * _UNIT_MS[duration.unit]
        start = at_ms // size * size
        return Window(start, start + size)
    day = local_date(at_ms, tz)
    if duration.unit == "d":
        block = (day.toordinal() - _EPOCH_MONDAY) // duration.count
        first = date.fromordinal(_EPOCH_MONDAY + block * duration.count)
        last = first + timedelta(days=duration.count)
        return Window(_local_midnight_ms(first, tz), _local_midnight_ms(last, tz))
    index = (day.year * 12 + day.month - 1) // duration.count * duration.count
    end_index = index + duration.count
    first = date(index // 12, index % 12 + 1, 1)
    last = date(end_index // 12, end_index % 12 + 1, 1)
    return Window(_local_midnight_ms(first, tz), _local_midnight_ms(last, tz))


def calendar_duration(duration: Duration) -> Duration:
    """The calendar period a duration means, as LiteLLM resets it: `30d` is the month (from the 1st),
    `24h` the local day; any other duration is itself."""
    if duration == Duration(30, "d"):
        return Duration(1, "mo")
    if duration == Duration(24, "h"):
        return Duration(1, "d")
    return duration


def describe_window(duration: Duration, mode: WindowMode, tz: tzinfo) -> str:
    """In words: which window a budget of this duration uses, and when it resets."""
    zone = str(tz)
    if mode == "sliding":
        return f"sliding: the last {duration}, moving by whole minutes"
    period = calendar_duration(duration)
    if period.unit == "mo":
        months = "month" if period.count == 1 else f"{period.count} months (from January)"
        return f"calendar: each {months}, from the 1st at 00:00 {zone}"
    if period.unit == "d":
        if period.count == 1:
            return f"calendar: each day, from 00:00 {zone}"
        if period.count == 7:
            return f"calendar: each week, from Monday 00:00 {zone}"
        return f"calendar: blocks of {period.count} days from 00:00 {zone}, counted from Monday 1970-01-05"
    return f"calendar: blocks of {period}, aligned to the Unix epoch (UTC)"


def sliding_window(duration: Duration, at_ms: int) -> Window:
    length = duration.ms
    if length is None:
        raise BudgetError("sliding windows are measured in s, m, h or d, not months")
    end = at_ms // MINUTE_MS * MINUTE_MS + MINUTE_MS
    return Window(end - length, end)


def check_window(duration: Duration, mode: WindowMode) -> None:
    """Raise BudgetError for a duration the mode cannot serve."""
    if mode != "sliding":
        return
    length = duration.ms
    if length is None or length < MINUTE_MS or length % MINUTE_MS:
        raise BudgetError("sliding windows are whole minutes from 1m to 7d (e.g. '1h', '24h', '7d')")
    if length > MAX_SLIDING_MS:
        raise BudgetError("sliding windows are at most 7d; use a calendar window for longer budgets")


@dataclass(frozen=True)
class BudgetRule:
    """A budget as the decision needs it (the wire form is schemas.budgets.BudgetDefinition)."""

    tag: str
    max_budget: Decimal | None
    duration: Duration
    mode: WindowMode = "calendar"
    soft_budget: Decimal | None = None
    thresholds: tuple[int, ...] = DEFAULT_ALERT_THRESHOLDS

    def window_at(self, at_ms: int, tz: tzinfo) -> Window:
        if self.mode == "sliding":
            return sliding_window(self.duration, at_ms)
        return calendar_window(calendar_duration(self.duration), at_ms, tz)

    def alert_points(self) -> tuple[int, ...]:
        """Thresholds that alert: the configured ones plus 100 (the block), when there is a max."""
        if self.max_budget is None:
            return ()
        return tuple(sorted(set(self.thresholds) | {100}))


def rule_of(definition: BudgetDefinition) -> BudgetRule:
    duration = parse_duration(definition.budget_duration)
    check_window(duration, definition.window)
    return BudgetRule(
        tag=definition.tag,
        max_budget=definition.max_budget_usd,
        duration=duration,
        mode=definition.window,
        soft_budget=definition.soft_budget_usd,
        thresholds=tuple(definition.alert_thresholds),
    )


# ---------------------------------------------------------------- history

# Every UTC offset in use is a multiple of 15 minutes, so a quarter hour never straddles a local midnight.
_QUARTER_HOUR_MS = 900_000


@lru_cache(maxsize=4096)
def _day_start(quarter: int, tz: tzinfo) -> int:
    return _local_midnight_ms(local_date(quarter * _QUARTER_HOUR_MS, tz), tz)


Tier = Literal["s", "m", "d"]
BucketKey = tuple[Tier, int]


@dataclass(frozen=True)
class HistoryPolicy:
    tz: tzinfo = UTC
    dedupe_ms: int = 5 * MINUTE_MS
    minute_history_ms: int = 8 * DAY_MS
    day_history_ms: int = 400 * DAY_MS


@dataclass(slots=True)
class SecondBucket:
    amount: Decimal = ZERO
    # The ids counted here, each once (the history's `seen` set is what dedupes; a list is cheaper).
    ids: list[str] = field(default_factory=list)
    # Counted since the last `take_unsaved()`, each id with its cost: a store writes only these
    # (a hot second's ids would otherwise be rewritten whole, and grow past a Kafka message, on
    # every batch).
    unsaved: list[tuple[str, Decimal]] = field(default_factory=list)

    def take_unsaved(self, max_chars: int) -> list[tuple[list[str], Decimal]]:
        """What was counted since the last call, in parts whose ids add up to at most `max_chars`
        characters (one id, whatever its length, at least), each part with its own amount."""
        taken, self.unsaved = self.unsaved, []
        parts: list[tuple[list[str], Decimal]] = []
        ids: list[str] = []
        amount, size = ZERO, 0
        for event_id, cost in taken:
            if ids and size + len(event_id) > max_chars:
                parts.append((ids, amount))
                ids, amount, size = [], ZERO, 0
            ids.append(event_id)
            amount += cost
            size += len(event_id)
        if ids:
            parts.append((ids, amount))
        return parts


@dataclass(slots=True)
class SpendHistory:
    """One tag's spend by event time (see the module docstring for the tiers)."""

    policy: HistoryPolicy
    seconds: dict[int, SecondBucket] = field(default_factory=dict)
    minutes: dict[int, Decimal] = field(default_factory=dict)
    days: dict[int, Decimal] = field(default_factory=dict)
    changed: set[BucketKey] = field(default_factory=set)
    seen: set[str] = field(default_factory=set)  # the ids of every second bucket

    def day_start(self, at_ms: int) -> int:
        return _day_start(at_ms // _QUARTER_HOUR_MS, self.policy.tz)

    def add(self, event_id: str, at_ms: int, amount: Decimal) -> bool:
        """Count one event's cost; False when this event was already counted."""
        if event_id in self.seen:
            return False
        day = self.day_start(at_ms)
        if day in self.days:
            self.days[day] += amount
            self.changed.add(("d", day))
            return True
        minute = at_ms // MINUTE_MS * MINUTE_MS
        if minute in self.minutes:
            self.minutes[minute] += amount
            self.changed.add(("m", minute))
            return True
        second = at_ms - at_ms % SECOND_MS
        bucket = self.seconds.get(second)
        if bucket is None:  # (not setdefault: it would build a bucket for every event)
            bucket = self.seconds[second] = SecondBucket()
        bucket.ids.append(event_id)
        self.seen.add(event_id)
        bucket.amount += amount
        bucket.unsaved.append((event_id, amount))
        self.changed.add(("s", second))
        return True

    def total(self, window: Window) -> Decimal:
        """Spend with event time in the window (bounds on whole minutes, or seconds within the dedupe tier)."""
        s, e = window.start_ms, window.end_ms
        total = sum((b.amount for k, b in self.seconds.items() if s <= k < e), ZERO)
        total += sum((v for k, v in self.minutes.items() if s <= k < e), ZERO)
        total += sum((v for k, v in self.days.items() if s <= k < e), ZERO)
        return total

    def roll_up(self, now_ms: int) -> None:
        """Move buckets that left a tier's horizon to the next tier; forget spend past the last."""
        policy = self.policy
        cutoff = now_ms - policy.dedupe_ms
        moving: dict[int, Decimal] = defaultdict(lambda: ZERO)
        for second in [k for k in self.seconds if k // MINUTE_MS * MINUTE_MS + MINUTE_MS <= cutoff]:
            moving[second // MINUTE_MS * MINUTE_MS] += self._drop_second(second).amount
        for minute, amount in moving.items():
            self.minutes[minute] = self.minutes.get(minute, ZERO) + amount
            self.changed.add(("m", minute))
        cutoff = now_ms - policy.minute_history_ms
        days: dict[int, Decimal] = defaultdict(lambda: ZERO)
        for minute in list(self.minutes):
            day = self.day_start(minute)
            if self.day_start(day + DAY_MS + HOUR_MS * 3) <= cutoff:  # the day's end (DST-proof)
                days[day] += self.minutes.pop(minute)
                self.changed.add(("m", minute))
        for day, amount in days.items():
            self.days[day] = self.days.get(day, ZERO) + amount
            self.changed.add(("d", day))
        cutoff = now_ms - policy.day_history_ms
        for day in [k for k in self.days if k < cutoff]:
            del self.days[day]
            self.changed.add(("d", day))

    def drop_covered(self) -> None:
        """After recovery: drop finer buckets an interrupted move left behind."""
        for minute in [k for k in self.minutes if self.day_start(k) in self.days]:
            del self.minutes[minute]
            self.changed.add(("m", minute))
        for second in [k for k in self.seconds if k // MINUTE_MS * MINUTE_MS in self.minutes]:
            self._drop_second(second)

    def restore_second(self, second: int, amount: Decimal, ids: Iterable[str]) -> SecondBucket:
        """Add a stored part of a second bucket back (recovery)."""
        bucket = self.seconds.setdefault(second, SecondBucket())
        bucket.amount += amount
        fresh = [i for i in dict.fromkeys(ids) if i not in self.seen]
        bucket.ids += fresh
        self.seen.update(fresh)
        return bucket

    def _drop_second(self, second: int) -> SecondBucket:
        bucket = self.seconds.pop(second)
        self.seen.difference_update(bucket.ids)
        self.changed.add(("s", second))
        return bucket

    def release_at(self, window: Window, duration_ms: int, budget: Decimal) -> int:
        """For a sliding window: when the spend in it falls below `budget` if nothing new comes."""
        buckets: list[tuple[int, Decimal]] = [(k, b.amount) for k, b in self.seconds.items()]
        buckets += list(self.minutes.items()) + list(self.days.items())
        remaining = self.total(window)
        for start, amount in sorted(b for b in buckets if window.start_ms <= b[0] < window.end_ms):
            remaining -= amount
            if remaining < budget:
                # The bucket leaves the window when the window's start passes it: at t = minute + N
                # the window is [minute + 1min, ...).
                return start // MINUTE_MS * MINUTE_MS + duration_ms
        return window.end_ms


# ---------------------------------------------------------------- decision


@dataclass(frozen=True, slots=True)
class BudgetStatus:
    """What the budget agent remembers for one budgeted tag."""

    window: Window | None = None
    spend: Decimal = ZERO
    fired: frozenset[int] = frozenset()
    soft_fired: bool = False
    blocked: bool = False
    block_end_ms: int | None = None
    projected_fired: bool = False


@dataclass(frozen=True)
class Projection:
    """A calendar window's spend carried to its end at the rate so far."""

    spend: Decimal  # projected spend at the window's end
    exhausted_at_ms: int | None  # when `max_budget` would be reached, if within the window
    settled: bool  # a tenth of the window has passed: enough to alert on


def project(spend: Decimal, max_budget: Decimal | None, window: Window, now_ms: int) -> Projection | None:
    """Spend at the end of `window` if it goes on at the rate since the window's start (None before
    the window has run a second)."""
    elapsed = min(now_ms, window.end_ms) - window.start_ms
    length = window.end_ms - window.start_ms
    if elapsed < SECOND_MS or length <= 0:
        return None
    with localcontext() as ctx:
        ctx.prec = 60  # a year's window a minute in, at the largest spends, stays exact
        projected = (spend * length / elapsed).quantize(Decimal("0.000000000001"))
        exhausted = None
        if max_budget is not None and spend > 0:
            if spend >= max_budget:
                exhausted = now_ms
            else:
                at = window.start_ms + int((max_budget * elapsed / spend).to_integral_value(ROUND_CEILING))
                exhausted = at if at < window.end_ms else None
    return Projection(projected, exhausted, elapsed * 10 >= length)


@dataclass(frozen=True)
class Alert:
    tag: str
    kind: Literal["threshold", "soft_budget", "projected"]
    threshold_pct: int | None
    spend: Decimal
    max_budget: Decimal | None
    soft_budget: Decimal | None
    window: Window
    projection: Projection | None = None


@dataclass(frozen=True)
class Evaluation:
    status: BudgetStatus
    alerts: list[Alert]
    change: Literal["none", "update", "blocked", "unblocked"]


def percent(spend: Decimal, budget: Decimal) -> Decimal:
    return spend * 100 / budget if budget > 0 else Decimal("Infinity") if spend > 0 else ZERO


def evaluate(
    rule: BudgetRule,
    history: SpendHistory,
    previous: BudgetStatus,
    clock_ms: int,
    *,
    rule_changed: bool = False,
    created: bool = False,
) -> Evaluation:
    """Decide the state of one budget at `clock_ms`.

    `previous.spend` must already include events counted in `previous.window`
    since it was computed (the caller adds them); a new window is summed from
    the history. `created`: the budget is new (fire thresholds already passed);
    `rule_changed`: it was updated (re-arm the thresholds not already passed).
    """
    window = rule.window_at(clock_ms, history.policy.tz)
    new_window = window != previous.window
    spend = history.total(window) if new_window or rule_changed else previous.spend
    pct = percent(spend, rule.max_budget) if rule.max_budget is not None else ZERO
    passed = frozenset(t for t in rule.alert_points() if pct >= t)
    soft_passed = rule.soft_budget is not None and spend >= rule.soft_budget
    if rule.mode == "sliding" and previous.window is not None:
        # The window moves every minute: what already fired stays fired until spend is well below it.
        fired = frozenset(t for t in previous.fired if pct > t - REARM_POINTS)
        soft_fired = previous.soft_fired and (
            rule.soft_budget is not None and spend * 100 > rule.soft_budget * (100 - REARM_POINTS)
        )
    else:
        fired = frozenset() if new_window else previous.fired
        soft_fired = False if new_window else previous.soft_fired
    if rule_changed and not created and not new_window:
        fired = passed  # an update re-arms only what is not already passed
        soft_fired = soft_passed
    alerts = [
        Alert(rule.tag, "threshold", t, spend, rule.max_budget, rule.soft_budget, window)
        for t in sorted(passed - fired)
    ]
    if soft_passed and not soft_fired:
        alerts.append(Alert(rule.tag, "soft_budget", None, spend, rule.max_budget, rule.soft_budget, window))
    blocked = rule.max_budget is not None and spend >= rule.max_budget
    projected_fired = False if new_window or rule_changed else previous.projected_fired
    if rule.mode == "calendar" and rule.max_budget is not None and not blocked and not projected_fired:
        projection = project(spend, rule.max_budget, window, clock_ms)
        if projection is not None and projection.settled and projection.spend > rule.max_budget:
            projected_fired = True
            alerts.append(
                Alert(
                    rule.tag, "projected", None, spend, rule.max_budget, rule.soft_budget, window, projection
                )
            )
    block_end = None
    if blocked and rule.max_budget is not None:
        block_end = window.end_ms
        if rule.mode == "sliding" and rule.duration.ms is not None:
            block_end = history.release_at(window, rule.duration.ms, rule.max_budget)
    status = BudgetStatus(
        window, spend, fired | passed, soft_fired or soft_passed, blocked, block_end, projected_fired
    )
    if blocked != previous.blocked:
        change: Literal["none", "update", "blocked", "unblocked"] = "blocked" if blocked else "unblocked"
    elif (
        replace(
            status,
            fired=previous.fired,
            soft_fired=previous.soft_fired,
            projected_fired=previous.projected_fired,
        )
        != previous
        or rule_changed
    ):
        change = "update"
    else:
        change = "none"
    return Evaluation(status, alerts, change)


@dataclass(slots=True)
class TagAccount:
    """Everything the budget agent keeps for one tag: its history, its budget and the budget's status."""

    tag: str
    history: SpendHistory
    rule: BudgetRule | None = None
    status: BudgetStatus = field(default_factory=BudgetStatus)
    max_event_ms: int = 0
    pending: Literal["", "created", "changed"] = ""
    duplicates: int = 0
    spend_moved: bool = False  # spend counted in the window since the last evaluation
    # Until when an evaluation without new spend or a new rule cannot change anything (a timer
    # evaluates only the accounts that are due).
    due_ms: int = 0

    def clock(self, now_ms: int) -> int:
        """The time the budget's window is found from: the wall clock alone (events never move it)."""
        return now_ms

    def add_spend(self, entries: list[tuple[str, int, Decimal]], now_ms: int | None = None) -> int:
        """Count (event_id, event time, cost) entries; returns how many were new. With `now_ms`, an
        event stamped after it counts at `now_ms`."""
        counted = 0
        window = self.status.window
        spend = self.status.spend
        for event_id, at_ms, amount in entries:
            if now_ms is not None and at_ms > now_ms:
                at_ms = now_ms
            if not self.history.add(event_id, at_ms, amount):
                self.duplicates += 1
                continue
            counted += 1
            self.max_event_ms = max(self.max_event_ms, at_ms)
            if window is not None and window.contains(at_ms):
                spend += amount
        if spend != self.status.spend:
            self.status = replace(self.status, spend=spend)
            self.spend_moved = True
        return counted

    def set_rule(self, rule: BudgetRule | None) -> None:
        if rule == self.rule:
            return
        self.pending = "created" if self.rule is None else "changed"
        self.rule = rule
        if rule is None:
            self.pending = ""
            self.status = BudgetStatus()

    def evaluate(self, now_ms: int) -> Evaluation | None:
        """The budget's decision now (None without a budget)."""
        if self.rule is None:
            return None
        result = evaluate(
            self.rule,
            self.history,
            self.status,
            self.clock(now_ms),
            rule_changed=self.pending != "",
            created=self.pending == "created",
        )
        if result.change == "none" and self.spend_moved:
            # The spend in the signal must follow the ledger, not only blocks and thresholds.
            result = replace(result, change="update")
        self.status = result.status
        self.pending = ""
        self.spend_moved = False
        self.due_ms = next_change_ms(self.rule, result.status, self.clock(now_ms))
        return result

    def announce(self) -> None:
        """Make the next evaluation send a signal even if nothing changed (a definition was applied)."""
        self.spend_moved = True


def next_change_ms(rule: BudgetRule, status: BudgetStatus, now_ms: int) -> int:
    """The earliest time after `now_ms` the wall clock alone can change this budget's decision: its
    window's end, a sliding window's next minute, or when a projection may first alert (a tenth into
    the window; after that, a projection only falls unless new spend comes)."""
    window = status.window
    if window is None:
        return 0
    if rule.mode == "sliding":
        return window.end_ms  # the window moves when the minute turns
    due = window.end_ms
    if rule.max_budget is not None and not status.blocked and not status.projected_fired:
        settle = window.start_ms + -(-(window.end_ms - window.start_ms) // 10)
        if settle > now_ms:
            due = min(due, settle)
    return due
