"""The throughput curve SPS(B): engine steps per second when a step carries B target tokens, from a profiled cost
table, and the verify-budget search of the DSpark paper (Algorithm 1 and its lagged production variant)."""
import bisect
import json
from pathlib import Path


class SpsCurve:
    """Step cost (seconds) measured at some token counts, plus the draft's cost at some request counts; between points
    costs are interpolated linearly and beyond the last point extrapolated along the last segment. Costs are made
    non-decreasing, so SPS is monotone in B. Up to graph_tokens (the largest CUDA graph measured; its tiers are all
    measured points) a step of B tokens costs what the smallest measured point >= B costs: it is padded up to that
    graph. Past it (eager steps) the costs are interpolated as usual."""

    def __init__(self, step_cost: dict[int, float], draft_cost: dict[int, float] | None = None,
                 graph_tokens: int = 0):
        if not step_cost:
            raise ValueError("an SPS curve needs at least one measured point")
        self.step_cost = monotone(step_cost)
        self.draft_cost = monotone(draft_cost or {1: 0.0})
        self.graph_tokens = graph_tokens

    @classmethod
    def load(cls, path: str | Path) -> "SpsCurve":
        data = json.loads(Path(path).read_text())
        return cls({int(b): c for b, c in data["step_cost_s"].items()},
                   {int(r): c for r, c in data.get("draft_cost_s", {}).items()}, data.get("graph_tokens", 0))

    def to_json(self) -> dict:
        return {"step_cost_s": dict(zip(*self.step_cost)), "draft_cost_s": dict(zip(*self.draft_cost)),
                "graph_tokens": self.graph_tokens}

    def step_seconds(self, num_tokens: int) -> float:
        xs, ys = self.step_cost
        if num_tokens <= self.graph_tokens:
            return ys[bisect.bisect_left(xs, num_tokens)]
        return interpolate(self.step_cost, num_tokens)

    def steps_per_second(self, num_tokens: int, num_requests: int) -> float:
        return self.for_requests(num_requests)(num_tokens)

    def plain_steps_per_second(self, num_tokens: int) -> float:
        """A step that drafts nothing (its requests decode one token each): no draft cost."""
        return 1.0 / self.step_seconds(num_tokens)

    def for_requests(self, num_requests: int):
        """SPS as a function of the step's token count B, for a step with this many requests."""
        draft = interpolate(self.draft_cost, num_requests)
        return lambda num_tokens: 1.0 / (draft + self.step_seconds(num_tokens))


def monotone(points: dict[int, float]) -> tuple[list[int], list[float]]:
    xs = sorted(int(x) for x in points)
    ys, running = [], 0.0
    for x in xs:
        running = max(running, float(points[x]))
        ys.append(running)
    return xs, ys


def interpolate(table: tuple[list[int], list[float]], x: int) -> float:
    xs, ys = table
    if len(xs) == 1:
        return ys[0] * max(1.0, x / xs[0]) if xs[0] else ys[0]
    i = min(max(bisect.bisect_left(xs, x), 1), len(xs) - 1)
    slope = (ys[i] - ys[i - 1]) / (xs[i] - xs[i - 1])
    return max(ys[0], ys[i - 1] + slope * (x - xs[i - 1]))


def admission_order(survivals: list[list[float]]) -> list[tuple[int, int]]:
    """Candidates (request, position) by descending survival; ties broken by position then request, never by value,
    so a request's positions are always admitted as a prefix."""
    cands = [(r, j) for r, row in enumerate(survivals) for j, a in enumerate(row) if a > 0]
    return sorted(cands, key=lambda rj: (-survivals[rj[0]][rj[1]], rj[1], rj[0]))


def early_stop_lengths(survivals: list[list[float]], sps) -> list[int]:
    """Algorithm 1: admit candidates one by one while Θ = (expected accepted) · SPS(B) keeps rising; stop at the
    first drop, so admitting position j never depends on anything sampled at or after j."""
    R = len(survivals)
    lengths = [0] * R
    tokens, expected = R, float(R)
    best = expected * sps(tokens)
    for r, j in admission_order(survivals):
        tokens, expected = tokens + 1, expected + survivals[r][j]
        theta = expected * sps(tokens)
        if theta <= best:
            break
        best, lengths[r] = theta, j + 1
    return lengths


def best_budget(survivals: list[list[float]], sps) -> int:
    """The number of draft tokens K maximising Θ over the whole (possibly jagged) curve: a global argmax, which is
    only lossless when the survivals are older than the drafts they will be applied to."""
    return best_point(survivals, sps)[0]


def best_point(survivals: list[list[float]], sps) -> tuple[int, float]:
    """best_budget's K and its Θ."""
    R = len(survivals)
    ranked = sorted((a for row in survivals for a in row if a > 0), reverse=True)
    best_k, best, expected = 0, R * sps(R), float(R)
    for k, a in enumerate(ranked, start=1):
        expected += a
        theta = expected * sps(R + k)
        if theta > best:
            best_k, best = k, theta
    return best_k, best


def drafting_pays(survivals: list[list[float]], curve: SpsCurve) -> bool:
    """Decided before drafting, from survivals at least one step old (so lossless): does the best budget's Θ, paying
    the draft's cost, beat a step that drafts nothing (Θ = R · SPS_plain(R))?"""
    R = len(survivals)
    k, theta = best_point(survivals, curve.for_requests(R))
    return k > 0 and theta > R * curve.plain_steps_per_second(R)


def top_k_lengths(survivals: list[list[float]], budget: int) -> list[int]:
    """Give a budget of draft tokens to the highest live survivals; each request gets a prefix."""
    lengths = [0] * len(survivals)
    for r, j in admission_order(survivals)[:budget]:
        lengths[r] = max(lengths[r], j + 1)
    return lengths
