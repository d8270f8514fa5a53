"""Predicted step time of every planned row: counted work (`flops`) → seconds on a device profile (`devices`).

The planner's tracked steps are also counted (`plan_step.run_step(count_cost=True)`); `attach_step_cost`
keeps the counts at the plan's batch B (and at 2B when a budget asks for the largest batch), so
`seconds_at(b)` gives the step at any batch: per operator,
FLOPs and bytes are affine in the batch (`flops.interpolate`). A depth-extrapolated plan (`layers=k`) is
linear in seconds between its k- and 2k-block plans, as its bytes are. `finish_step_times` fills the record
fields once every method is planned:

    step_time_s            one step at the planned batch
    time_vs_full           that over full fine-tuning's step at the same batch (None without a full row)
    max_batch_step_time_s  one step at the largest batch that fits (with a budget)
    time_per_example_s     step time / batch, at the largest batch that fits (else at the planned batch)
    step_flops             matrix-product and attention FLOPs of one step at the planned batch
"""
from __future__ import annotations

from .devices import DeviceProfile, get_profile
from .flops import StepCost, interpolate

DEFAULT_GPU_PROFILE = "h100"     # the GPU the memory plan was checked against


def profile_for(settings) -> DeviceProfile:
    name = getattr(settings, "device_profile", None)
    if name is None:
        name = "cpu" if settings.device == "cpu" else DEFAULT_GPU_PROFILE
    return get_profile(name)


class CountedCost:
    """Steps counted at one or two batch sizes of the same depth."""

    def __init__(self, first: StepCost, second: StepCost | None = None):
        self.first, self.second = first, second

    def step_at(self, batch_size: int) -> StepCost:
        if batch_size == self.first.batch_size or self.second is None:
            return self.first
        if batch_size == self.second.batch_size:
            return self.second
        return interpolate(self.first, self.second, batch_size) or self.first

    def seconds_at(self, batch_size: int, profile: DeviceProfile) -> float:
        step = self.step_at(batch_size)
        seconds = step.seconds(profile)
        if step.batch_size != batch_size:       # no per-operator match: proportional in the batch (fallback)
            seconds *= batch_size / step.batch_size
        return seconds

    def flops_at(self, batch_size: int) -> int:
        step = self.step_at(batch_size)
        return int(step.flops() * batch_size / step.batch_size)


class DepthCost:
    """A plan extrapolated from ka- and kb-block plans to n blocks: linear per block, like its bytes."""

    def __init__(self, a, b, ka: int, kb: int, n: int):
        self.a, self.b, self.ka, self.kb, self.n = a, b, ka, kb, n

    def _lin(self, x: float, y: float) -> float:
        return x + (y - x) * (self.n - self.ka) / (self.kb - self.ka)

    def seconds_at(self, batch_size: int, profile: DeviceProfile) -> float:
        return self._lin(self.a.seconds_at(batch_size, profile), self.b.seconds_at(batch_size, profile))

    def flops_at(self, batch_size: int) -> int:
        return int(round(self._lin(self.a.flops_at(batch_size), self.b.flops_at(batch_size))))


def attach_step_cost(plan, runner, settings) -> None:
    """The counted work of the steps `runner` (a planner `_MethodRunner`) ran: at B, and at 2B when a
    budget searched for the largest batch (both counted in the tracked steps themselves, no extra step)."""
    b0 = settings.batch_size
    first = runner.step(b0).cost
    second = runner.cache[2 * b0].cost if 2 * b0 in runner.cache else None
    if first is not None:
        plan.cost = CountedCost(first, second)


def extrapolate_cost(out, a, b, ka: int, kb: int, n: int) -> None:
    if getattr(a, "cost", None) is not None and getattr(b, "cost", None) is not None:
        out.cost = DepthCost(a.cost, b.cost, ka, kb, n)


def is_full_row(m) -> bool:
    return m.method == "full" and not m.options and m.status == "ok"


def finish_step_times(methods, settings, reference=None) -> None:
    """Seconds for every planned row on the settings' device profile; ratios to the full row
    (or to `reference`, a full fine-tuning plan of the same workload planned elsewhere)."""
    profile = profile_for(settings)
    b = settings.batch_size
    for m in methods:
        cost = getattr(m, "cost", None)
        if m.status != "ok" or cost is None:
            continue
        m.step_time_s = cost.seconds_at(b, profile)
        m.step_flops = cost.flops_at(b)
        m.device_profile = profile.name
        if m.max_batch_size:
            m.max_batch_step_time_s = cost.seconds_at(m.max_batch_size, profile)
            m.time_per_example_s = m.max_batch_step_time_s / m.max_batch_size
        elif m.max_batch_size is None:
            m.time_per_example_s = m.step_time_s / b
    full = reference or next((m for m in methods if is_full_row(m) and m.step_time_s), None)
    if full is not None and full.step_time_s:
        for m in methods:
            if m.step_time_s is not None:
                m.time_vs_full = m.step_time_s / full.step_time_s
