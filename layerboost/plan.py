"""Layer plans: which attention kind each decoder layer gets.

A plan is a list of `LayerSpec` (one per decoder layer) saved as JSON with a schema version:

    {"schema_version": 1, "layers": [{"kind": "softmax"}, {"kind": "swa", "window": 64}, {"kind": "none"}]}
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from . import kinds as K
from .targets import EMPTY_FULL_CACHE, TARGETS, empty_full_cache, target_problems  # noqa: F401 (plan's API)

SCHEMA_VERSION = 1


class PlanError(ValueError):
    """A plan is invalid; the message lists every problem found."""


@dataclass(frozen=True)
class LayerSpec:
    """One decoder layer's attention.

    Args:
        kind: a registered kind's name (`layerboost.kinds.KINDS`).
        window: tokens of softmax context for `swa` / `linear_swa` (the token itself included).
        feature_dim: linear-attention features per head for `linear_swa` (default: head_dim).
        mix: how `linear_swa` weighs window and linear terms, one of `kinds.LINEAR_MIXES` (default "gate").
    """

    kind: str
    window: int | None = None
    feature_dim: int | None = None
    mix: str | None = None

    def problems(self, where: str = "layer") -> list[str]:
        if self.kind not in K.KINDS:
            return [f"{where}: unknown kind {self.kind!r}; known kinds: {', '.join(K.KINDS)}"]
        takes = K.kind(self.kind).options
        out = []
        for name in ("window", "feature_dim", "mix"):
            value = getattr(self, name)
            if value is not None and name not in takes:
                users = " / ".join(repr(k) for k, r in K.KINDS.items() if name in r.options)
                out.append(f"{where}: kind {self.kind!r} takes no {name!r} (got {value!r})" if name == "window" else
                           f"{where}: {name!r} only applies to {users}, not {self.kind!r}")
        if "window" in takes:
            if not isinstance(self.window, int) or isinstance(self.window, bool):
                out.append(f"{where}: kind {self.kind!r} needs an integer 'window', got {self.window!r}")
            elif self.window <= 0:
                out.append(f"{where}: window must be > 0, got {self.window}")
        f = self.feature_dim
        if "feature_dim" in takes and f is not None and (not isinstance(f, int) or isinstance(f, bool) or f <= 0):
            out.append(f"{where}: feature_dim must be a positive integer, got {f!r}")
        if "mix" in takes and self.mix is not None and self.mix not in K.LINEAR_MIXES:
            out.append(f"{where}: mix must be one of {', '.join(K.LINEAR_MIXES)}, got {self.mix!r}")
        return out

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass(frozen=True)
class LayerPlan:
    """Attention kind per decoder layer. Construction validates and reports every problem at once."""

    layers: tuple[LayerSpec, ...]
    num_layers: int | None = field(default=None, compare=False)

    def __post_init__(self):
        object.__setattr__(self, "layers", tuple(self.layers))
        problems = []
        for i, spec in enumerate(self.layers):
            if not isinstance(spec, LayerSpec):
                problems.append(f"layer {i}: expected a LayerSpec, got {type(spec).__name__}")
            else:
                problems += spec.problems(f"layer {i}")
        if not self.layers:
            problems.append("the plan has no layers")
        if self.num_layers is not None and len(self.layers) != self.num_layers:
            problems.append(
                f"the plan has {len(self.layers)} layers but the model has {self.num_layers} decoder layers: "
                "give exactly one entry per decoder layer"
            )
        if problems:
            raise PlanError("invalid layer plan:\n  - " + "\n  - ".join(problems))

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def from_kinds(cls, kinds: list[str], window: int | None = None, num_layers: int | None = None) -> "LayerPlan":
        """`["softmax", "swa", "none"]` -> plan; `window` applies to the windowed kinds."""
        return cls(
            tuple(LayerSpec(k, window if k in K.KINDS and K.KINDS[k].windowed else None) for k in kinds), num_layers=num_layers
        )

    @classmethod
    def uniform(cls, kind: str, num_layers: int, window: int | None = None) -> "LayerPlan":
        return cls.from_kinds([kind] * num_layers, window=window)

    @classmethod
    def from_dict(cls, data: dict, num_layers: int | None = None) -> "LayerPlan":
        if not isinstance(data, dict) or not isinstance(data.get("layers"), list):
            raise PlanError("a plan must be a JSON object with a 'layers' list (and 'schema_version')")
        version = data.get("schema_version", SCHEMA_VERSION)
        if version != SCHEMA_VERSION:
            raise PlanError(f"plan schema_version {version} is not supported (this layerboost reads {SCHEMA_VERSION})")
        problems, specs = [], []
        for i, entry in enumerate(data["layers"]):
            if isinstance(entry, str):
                entry = {"kind": entry}
            if not isinstance(entry, dict):
                problems.append(f"layer {i}: expected an object like {{'kind': 'swa', 'window': 64}}, got {entry!r}")
                continue
            unknown = set(entry) - {"kind", "window", "feature_dim", "mix"}
            if unknown:
                problems.append(f"layer {i}: unknown field(s) {sorted(unknown)}; allowed: kind, window, feature_dim, mix")
            if "kind" not in entry:
                problems.append(f"layer {i}: missing 'kind'")
                continue
            specs.append(LayerSpec(entry["kind"], entry.get("window"), entry.get("feature_dim"), entry.get("mix")))
        if problems:
            # Collect the per-spec problems too, so the user sees everything at once.
            problems += [p for i, s in enumerate(specs) for p in s.problems(f"entry {i}")]
            raise PlanError("invalid layer plan:\n  - " + "\n  - ".join(problems))
        return cls(tuple(specs), num_layers=num_layers)

    @classmethod
    def load(cls, path: str | Path, num_layers: int | None = None) -> "LayerPlan":
        path = Path(path)
        if path.is_dir():
            raise PlanError(f"{path} is a folder: give the plan JSON file (e.g. {path / 'plan.json'})")
        if not path.is_file():
            raise PlanError(f"plan file {path} does not exist")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise PlanError(f"plan file {path} is not valid JSON: {e}") from e
        return cls.from_dict(data, num_layers=num_layers)

    # ---- output ---------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"schema_version": SCHEMA_VERSION, "layers": [s.to_dict() for s in self.layers]}

    def save(self, path: str | Path, extra: dict | None = None) -> None:
        """Write the plan JSON atomically; `extra`: more top-level keys (e.g. `written_by`), ignored when read."""
        from .util import write_json

        write_json(path, {**self.to_dict(), **(extra or {})})

    def __len__(self) -> int:
        return len(self.layers)

    def __getitem__(self, i: int) -> LayerSpec:
        return self.layers[i]

    @property
    def kinds(self) -> list[str]:
        return [s.kind for s in self.layers]

    def counts(self) -> dict[str, int]:
        """Layers per kind, for every kind."""
        return {k: self.kinds.count(k) for k in K.KINDS}

    def table(self, scores: list[float] | None = None) -> str:
        """A readable table: layer, kind, window (and a score column if given)."""
        head = f"{'layer':>5}  {'kind':<10} {'window':>6}" + ("  score" if scores is not None else "")
        rows = [head]
        for i, s in enumerate(self.layers):
            row = f"{i:>5}  {s.kind:<10} {s.window if s.window else '-':>6}"
            if scores is not None:
                row += f"  {scores[i]:.4f}"
            rows.append(row)
        c = self.counts()
        rows.append("total: " + ", ".join(f"{n} {k}" for k, n in c.items() if n))
        return "\n".join(rows)


# ---- policies: sensitivity scores -> plan ---------------------------------------------------------
# `scores[i]` is layer i's sensitivity (benchmark drop when its attention is removed): higher means
# more sensitive, so the most sensitive layers keep softmax and the least sensitive lose attention.


def _by_rank(scores: list[float], n_softmax: int, n_swa: int, window: int, swa_kind: str = "swa") -> LayerPlan:
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))  # most sensitive first
    kinds = ["none"] * len(scores)
    for r, i in enumerate(order):
        kinds[i] = "softmax" if r < n_softmax else swa_kind if r < n_softmax + n_swa else "none"
    return LayerPlan.from_kinds(kinds, window=window)


def plan_by_counts(scores, softmax: int | None = None, swa: int | None = None, none: int | None = None,
                   window: int = 64, swa_kind: str = "swa") -> LayerPlan:
    """Exact counts per kind; one count may be left out (None) and takes the remaining layers."""
    n = len(scores)
    given = [c for c in (softmax, swa, none) if c is not None]
    if any(c < 0 for c in given):
        raise PlanError(f"layer counts must be >= 0, got softmax={softmax} swa={swa} none={none}")
    missing = 3 - len(given)
    if missing > 1:
        raise PlanError("give at least two of the counts --softmax/--swa/--none")
    rest = n - sum(given)
    softmax, swa, none = (c if c is not None else rest for c in (softmax, swa, none))
    if softmax + swa + none != n or min(softmax, swa, none) < 0:
        raise PlanError(f"counts softmax={softmax} + swa={swa} + none={none} must add up to the {n} layers")
    return _by_rank(scores, softmax, swa, window, swa_kind)


def plan_by_fractions(scores, softmax: float, swa: float, window: int = 64, swa_kind: str = "swa") -> LayerPlan:
    """Fractions of layers for softmax and swa (the rest: none), rounded to whole layers."""
    if not (0 <= softmax <= 1 and 0 <= swa <= 1 and softmax + swa <= 1 + 1e-9):
        raise PlanError(f"fractions must be in [0, 1] and add up to at most 1, got softmax={softmax} swa={swa}")
    n = len(scores)
    n_soft = round(softmax * n)
    n_swa = min(n - n_soft, round(swa * n))
    return _by_rank(scores, n_soft, n_swa, window, swa_kind)


def plan_by_thresholds(scores, softmax_above: float, none_below: float, window: int = 64,
                       swa_kind: str = "swa") -> LayerPlan:
    """softmax where the drop >= softmax_above, none where it is < none_below, swa in between."""
    if none_below > softmax_above:
        raise PlanError(f"none_below ({none_below}) must be <= softmax_above ({softmax_above})")
    kinds = ["softmax" if s >= softmax_above else "none" if s < none_below else swa_kind for s in scores]
    return LayerPlan.from_kinds(kinds, window=window)


# ---- policies without sensitivity scores (baselines: "w/o layer selection") ------------------------


def _check_counts(n_layers: int, softmax: int, swa: int, none: int) -> None:
    if min(softmax, swa, none) < 0 or softmax + swa + none != n_layers:
        raise PlanError(f"counts softmax={softmax} + swa={swa} + none={none} must be >= 0 and add up to {n_layers} layers")


def plan_random(n_layers: int, softmax: int, swa: int, none: int, seed: int, window: int = 64,
                swa_kind: str = "swa") -> LayerPlan:
    """The same counts placed uniformly at random (seeded): the "w/o layer selection" baseline."""
    import random

    _check_counts(n_layers, softmax, swa, none)
    kinds = ["softmax"] * softmax + [swa_kind] * swa + ["none"] * none
    random.Random(f"plan_random:{seed}").shuffle(kinds)
    return LayerPlan.from_kinds(kinds, window=window)


def plan_pattern(n_layers: int, softmax: int, swa: int, none: int, window: int = 64, swa_kind: str = "swa") -> LayerPlan:
    """The same counts interleaved as evenly as possible, starting softmax, swa, none (10/10/10:
    softmax, swa, none repeated): layer i takes the kind furthest behind its share of i + 1 layers."""
    _check_counts(n_layers, softmax, swa, none)
    return LayerPlan.from_kinds(spread({"softmax": softmax, swa_kind: swa, "none": none}), window=window)


def spread(counts: dict[str, int], pin_softmax_ends: bool = False) -> list[str]:
    """Kinds laid out as evenly as their counts allow: each layer in turn takes the kind furthest behind its
    even share of the layers so far (ties: the order of `counts`). `pin_softmax_ends`: with >= 2 softmax
    layers, the first and the last layer are softmax and the rest is spread over the layers between."""
    n = sum(counts.values())
    kinds: list[str | None] = [None] * n
    left = dict(counts)
    if pin_softmax_ends and left.get("softmax", 0) >= 2:
        kinds[0] = kinds[-1] = "softmax"
        left["softmax"] -= 2
    slots = [i for i in range(n) if kinds[i] is None]
    used = dict.fromkeys(left, 0)
    for j, i in enumerate(slots):
        k = max((k for k in left if used[k] < left[k]),
                key=lambda k: ((j + 1) * left[k] / len(slots) - used[k], -list(left).index(k)))
        kinds[i] = k
        used[k] += 1
    return kinds  # type: ignore[return-value]


def check_fits(plan: LayerPlan | None, config, windows=()) -> None:
    """Raise unless `plan` has one entry per decoder layer of the model `config` and no window (of the
    plan, or among `windows`) is longer than the model's context.

    Raises:
        PlanError: listing both problems.
    """
    problems, n = [], config.num_hidden_layers
    if plan is not None and len(plan.layers) != n:
        problems.append(f"the plan has {len(plan.layers)} layers but the model has {n}: give one entry per decoder layer")
    context = getattr(config, "max_position_embeddings", None)
    windows = [*windows, *(s.window for s in (plan.layers if plan is not None else ()))]
    too_long = sorted({w for w in windows if w and context and w > context})
    if too_long:
        problems.append(f"window {too_long[-1]} is longer than the model's context of {context} tokens: "
                        f"use a window below {context}")
    if problems:
        raise PlanError("the plan does not fit the model: " + "; ".join(problems))


def relative_cost(plan: LayerPlan, config, context: int, measure: str = "kv") -> float:
    """Cost of `plan` relative to all-softmax at `context` tokens.

    measure="kv": KV-cache bytes. measure="decode": bytes read per decoded token (weights of
    each layer + its KV cache), the quantity memory-bound decoding pays for.
    """
    nh, nkv, d = config.num_attention_heads, config.num_key_value_heads, config.hidden_size
    hs = getattr(config, "head_dim", None) or d // nh
    kv_per_tok = 2 * nkv * hs

    def kv(spec):
        return K.kind(spec.kind).cached_tokens(spec, context) * kv_per_tok

    if measure == "kv":
        return sum(kv(s) for s in plan.layers) / (len(plan) * context * kv_per_tok)
    if measure != "decode":
        raise PlanError(f"unknown cost measure {measure!r}; use 'kv' or 'decode'")
    attn_w = K.kind("softmax").weight_elements(None, d, nh, nkv, hs)
    mlp_w = 3 * d * config.intermediate_size

    def layer(spec):  # MLP, the token mixer's weights (none: 0), its cache
        return mlp_w + K.kind(spec.kind).weight_elements(spec, d, nh, nkv, hs) + kv(spec)

    base = len(plan) * (mlp_w + attn_w + context * kv_per_tok)
    return sum(layer(s) for s in plan.layers) / base


def plan_by_budget(scores, config, budget: float, context: int = 4096, window: int = 64, measure: str = "kv",
                   none_below: float | None = None, swa_kind: str = "swa") -> LayerPlan:
    """The plan with the most softmax layers (the most sensitive ones) whose relative cost <= budget.

    Layers leave softmax least-sensitive first; if every layer is windowed and the cost is still
    over budget, windowed layers become `none`, least-sensitive first. Layers whose drop is below
    `none_below` are made `none` from the start.

    Raises:
        PlanError: no plan meets the budget.
    """
    order = sorted(range(len(scores)), key=lambda i: (scores[i], i))  # least sensitive first
    kinds = ["none" if none_below is not None and scores[i] < none_below else "softmax" for i in range(len(scores))]

    def cost():
        return relative_cost(LayerPlan.from_kinds(kinds, window=window), config, context, measure)

    for target_from, target in (("softmax", swa_kind), (swa_kind, "none")):
        for i in order:
            if cost() <= budget:
                return LayerPlan.from_kinds(kinds, window=window)
            if kinds[i] == target_from:
                kinds[i] = target
    if cost() <= budget:
        return LayerPlan.from_kinds(kinds, window=window)
    raise PlanError(f"no plan reaches a relative {measure} cost of {budget} (all-none costs {cost():.3f})")


# ---- the speed policy: the least predicted quality loss at a predicted speed ------------------------------


@dataclass(frozen=True)
class Pick:
    """One candidate of the target search: a plan, its predicted quality loss (the sum of its layers' measured KL
    costs, analyze --windows), and its predicted decode speed and KV cache relative to the base's."""

    plan: LayerPlan
    loss: float
    speedup: float | None
    kv: float

    def label(self) -> str:
        """"softmax/swa/none" counts and the window, e.g. "1/26/3 w1024"."""
        c = self.plan.counts()
        w = next((s.window for s in self.plan.layers if s.window), None)
        return f"{c['softmax']}/{c['swa']}/{c['none']}" + (f" w{w}" if w and c["swa"] else "")


def cost_key(spec: LayerSpec) -> str:
    """How a layer variant is named among the window costs of sensitivity.json: "none", "swa:64"."""
    return spec.kind + (f":{spec.window}" if spec.window else "")


def summed_cost(plan: LayerPlan, costs: dict[str, list[float]]) -> float | None:
    """The speed policy's predicted quality loss of any plan: its changed layers' costs added (None: a kind or
    window the analysis did not measure)."""
    keys = [(i, cost_key(s)) for i, s in enumerate(plan.layers) if s.kind != "softmax"]
    return None if any(k not in costs for _, k in keys) else sum(costs[k][i] for i, k in keys)


def _placements(loss: dict[str, list[float]], n: int, window: int, layer0_attends: bool):
    """For every count pair (softmax a, swa b, none n - a - b): the placement of least summed cost (an exact dynamic
    programme over layers; softmax costs 0). Yields (loss, plan)."""
    inf = float("inf")
    none_cost = list(loss[cost_key(LayerSpec("none"))])
    swa_cost = loss[cost_key(LayerSpec("swa", window))]
    if layer0_attends:
        none_cost[0] = inf
    f = {(0, 0): 0.0}
    back = []
    for i in range(n):
        g, choice = {}, {}
        for (a, b), v in f.items():
            for kind, key, c in (("softmax", (a + 1, b), 0.0), ("swa", (a, b + 1), swa_cost[i]), ("none", (a, b), none_cost[i])):
                if v + c < g.get(key, inf):
                    g[key], choice[key] = v + c, (kind, (a, b))
        f = g
        back.append(choice)
    for (a, b), v in f.items():
        if v == inf:
            continue
        kinds, key = [], (a, b)
        for i in range(n - 1, -1, -1):
            kind, key = back[i][key]
            kinds.append(kind)
        yield v, LayerPlan.from_kinds(kinds[::-1], window=window)


def target_candidates(costs: dict[str, list[float]], policy: "PlanPolicy", speed=None, geometry=None,
                      config=None) -> list[Pick]:
    """Every plan the target search weighs (one per count triple and window, each at its least-cost placement), with
    its predictions. `costs`: sensitivity.json's window_costs["kl"] ("none", "swa:W" -> per-layer KL); `speed`: a
    speed.SpeedModel (needed for a speedup target); `geometry`: how the engine allocates its cache (a
    speed.Geometry; default: that of `speed`, else exactly the tokens each kind keeps).

    Raises:
        PlanError: a window the analysis did not measure, or no costs at all.
    """
    if "none" not in costs:
        raise PlanError("the sensitivity file has no window costs: run analyze with --windows (e.g. 64,256,1024)")
    measured = sorted(int(k.split(":")[1]) for k in costs if k.startswith("swa:"))
    windows = policy.windows or measured
    missing = [w for w in windows if w not in measured]
    if missing:
        raise PlanError(f"window(s) {missing} were not measured (the analysis has {measured or 'none'}): analyze with "
                        f"--windows {','.join(map(str, sorted(set(measured) | set(missing))))} or plan among the measured")
    n = len(costs["none"])
    geometry = geometry or (speed.geometry if speed is not None else None)

    def cells(plan):
        if geometry is not None:
            return sum(geometry.kv_cells(s, policy.context, policy.parallel) for s in plan.layers)
        return sum(K.kind(s.kind).cached_tokens(s, policy.context) for s in plan.layers)

    base = LayerPlan.uniform("softmax", n)
    base_kv = cells(base)
    picks, seen = [], set()
    for w in windows:
        for loss, plan in _placements(costs, n, w, TARGETS[policy.target].attention_in_layer0):
            if config is not None:
                plan = cap_to_native(plan, config)[0]
            if plan in seen or target_problems(plan, policy.target) or not _runs_in(plan, policy):
                continue
            seen.add(plan)
            kv = cells(plan) / base_kv
            up = speed.speedup(plan, base, policy.context, policy.parallel) if speed is not None else None
            picks.append(Pick(plan, loss, up, kv))
    return picks


def _runs_in(plan: LayerPlan, policy: "PlanPolicy") -> bool:
    """Released llama.cpp runs softmax + none (deci) and softmax + swa (granite_swa), not the three together."""
    kinds = set(plan.kinds)
    return not (policy.build == "stock" and {"swa", "none"} <= kinds)


def frontier(picks: list[Pick]) -> list[Pick]:
    """The picks no other pick beats in both predicted loss and predicted speedup, fastest last."""
    out = []
    for p in sorted(picks, key=lambda p: (p.loss, -(p.speedup or 0))):
        if not out or (p.speedup or 0) > (out[-1].speedup or 0):
            out.append(p)
    return out


def plan_by_target(costs: dict[str, list[float]], policy: "PlanPolicy", speed=None, geometry=None,
                   config=None, retrieval=None) -> tuple[Pick, list[Pick]]:
    """The pick of least predicted loss whose predicted speedup >= policy.speedup and KV <= policy.kv_budget, and
    the frontier it was chosen from. With policy.keep_retrieval, the layers `retrieval` ranks highest stay softmax.

    Raises:
        PlanError: the target is out of reach (naming the fastest / smallest reachable plan).
    """
    if policy.speedup is not None and speed is None:
        raise PlanError("a speedup target needs a speed model of the engine (layerboost speed calibrate)")
    keep = kept_for_retrieval(retrieval, policy.keep_retrieval)
    if keep:  # the retrieving layers cost too much to lose
        costs = {name: [float("inf") if i in keep else v for i, v in enumerate(c)] for name, c in costs.items()}
    picks = target_candidates(costs, policy, speed, geometry, config)
    ok = [p for p in picks if (policy.speedup is None or p.speedup >= policy.speedup)
          and (policy.kv_budget is None or p.kv <= policy.kv_budget + 1e-12)]
    where = (f"in {policy.target}" + (" (stock build)" if policy.build == "stock" else "")
             + f" at {policy.context} tokens" + (f", {policy.parallel} sequences" if policy.parallel > 1 else ""))
    if not ok:
        if policy.speedup is not None:
            fast = max((p for p in picks if policy.kv_budget is None or p.kv <= policy.kv_budget + 1e-12),
                       key=lambda p: p.speedup, default=None)
            reach = f"the largest reachable is {fast.speedup:.2f}x ({fast.label()})" if fast else "no plan fits the KV budget"
            raise PlanError(f"no plan reaches {policy.speedup:g}x the base's decode speed {where}: {reach}")
        small = min(picks, key=lambda p: p.kv)
        raise PlanError(f"no plan keeps the KV cache within {policy.kv_budget:g}x the base's {where}: the smallest "
                        f"is {small.kv:.3f}x ({small.label()})")
    best = min(ok, key=lambda p: (p.loss, -(p.speedup or 0), p.kv))
    return best, frontier(picks)


# ---- policies: the one place that turns a policy's settings into a plan ------------------------------


POLICIES = ("counts", "fractions", "thresholds", "budget", "speed")
BUILDS = ("patched", "stock")  # llama.cpp with engines/llama.cpp/deci-sliding-window.patch, or as released
RANKINGS = ("auto", "iterative", "one-shot")  # see sensitivity.plan_scores


@dataclass
class PlanPolicy:
    """How a plan is placed from sensitivity scores (the `plan:` section of a run config, or plan's options).

    Args:
        policy: counts (softmax / swa / none layer counts, two of three), fractions ([softmax, swa] shares),
            thresholds (score >= softmax_above keeps softmax, < none_below loses attention), budget (the
            cheapest plan whose cost relative to the base is <= budget at `context` tokens, `budget_measure`).
        window: window of the windowed layers; kind: swa or linear_swa for them.
        score: the sensitivity score layers are ranked by (see sensitivity.plan_scores).
        ranking: iterative (by the analysis' iterative history of `score`), one-shot, or auto (iterative
            where the analysis has that history).
        target: what will serve the model (see TARGETS); only plans it can run are placed.
        speedup, kv_budget, parallel, build, windows: the speed policy (`plan_by_target`): the plan of least
            predicted quality loss whose predicted decode speed at `context` tokens (`parallel` sequences) is at
            least `speedup` x the base's and whose KV cache is at most `kv_budget` x the base's, among `windows`
            (None: every window the analysis measured); build stock keeps to plans released llama.cpp runs.
        keep_retrieval: keep softmax in the K layers whose attention alone brings back most of a long-context
            answer (analyze --retrieval; sensitivity.retrieval), whatever the score or the window costs say.
    """

    policy: str = "counts"
    softmax: int | None = None
    swa: int | None = None
    none: int | None = None
    fractions: list[float] | None = None
    softmax_above: float | None = None
    none_below: float | None = None
    budget: float | None = None
    budget_measure: str = "kv"
    context: int = 4096
    window: int = 64
    kind: str = "swa"
    score: str = "kl"  # kl | margin | drop | cosine (the signals compared after healing: docs/experiments/selection-signals.md)
    ranking: str = "auto"
    target: str = "layerboost"
    speedup: float | None = None
    kv_budget: float | None = None
    parallel: int = 1
    build: str = "patched"
    windows: list[int] | None = None
    keep_retrieval: int = 0

    @property
    def thresholds(self) -> bool:
        """Whether scores are compared with thresholds (softmax_above, none_below), which are in the units of
        the one-shot scores: such a policy never ranks by an iterative history."""
        return self.policy == "thresholds" or (self.policy == "budget" and self.none_below is not None)

    def problems(self) -> list[str]:
        out = []
        if self.policy not in POLICIES:
            out.append(f"policy {self.policy!r} is not one of {', '.join(POLICIES)}")
        if self.policy == "counts" and sum(v is None for v in (self.softmax, self.swa, self.none)) > 1:
            out.append("the counts policy: give at least two of the counts (softmax, swa, none)")
        if self.policy == "fractions" and (not self.fractions or len(self.fractions) != 2):
            out.append("fractions: give [softmax_fraction, swa_fraction]")
        if self.policy == "thresholds" and (self.softmax_above is None or self.none_below is None):
            out.append("the thresholds policy needs softmax_above and none_below")
        if self.policy == "budget" and self.budget is None:
            out.append("the budget policy needs budget")
        if self.policy == "speed":
            if self.speedup is None and self.kv_budget is None:
                out.append("the speed policy needs speedup (x the base's decode tokens/s) or kv_budget (x its KV cache)")
            if self.speedup is not None and not (isinstance(self.speedup, (int, float)) and 0 < self.speedup < 1e3):
                out.append(f"speedup must be a number > 0, got {self.speedup!r}")
            if self.kv_budget is not None and not (isinstance(self.kv_budget, (int, float)) and 0 < self.kv_budget <= 1):
                out.append(f"kv_budget must be in (0, 1], got {self.kv_budget!r}")
            if self.speedup is not None and self.target == "transformers":
                out.append("target transformers has no speed model: plan for llama.cpp or layerboost")
            if self.kind != "swa":
                out.append("the speed policy places swa layers (the kind its window costs are measured for)")
        if self.build not in BUILDS:
            out.append(f"build {self.build!r} must be one of {', '.join(BUILDS)}")
        elif self.build == "stock" and self.target != "llama.cpp":
            out.append("build stock applies to target llama.cpp")
        if not isinstance(self.parallel, int) or isinstance(self.parallel, bool) or self.parallel < 1:
            out.append(f"parallel must be a whole number >= 1, got {self.parallel!r}")
        if self.windows is not None and (not isinstance(self.windows, (list, tuple)) or not self.windows
                                         or any(not isinstance(w, int) or w <= 0 for w in self.windows)):
            out.append(f"windows must be a list of whole numbers > 0, got {self.windows!r}")
        if not isinstance(self.keep_retrieval, int) or isinstance(self.keep_retrieval, bool) or self.keep_retrieval < 0:
            out.append(f"keep_retrieval must be a whole number >= 0, got {self.keep_retrieval!r}")
        elif self.policy == "counts" and self.softmax is not None and self.keep_retrieval > self.softmax:
            out.append(f"keep_retrieval {self.keep_retrieval} keeps more softmax layers than the {self.softmax} asked for")
        if self.ranking not in RANKINGS:
            out.append(f"ranking {self.ranking!r} must be one of {', '.join(RANKINGS)}")
        elif self.ranking == "iterative" and self.thresholds:
            out.append("ranking iterative cannot serve thresholds (softmax_above / none_below), which are in "
                       "one-shot score units: rank one-shot or auto, or place the plan by counts")
        if self.target not in TARGETS:
            out.append(f"target {self.target!r} must be one of {', '.join(TARGETS)}")
        elif self.target != "layerboost" and self.kind != "swa":
            out.append(f"target {self.target} runs no {self.kind} layers: use swa for the windowed layers")
        elif self.target == "transformers" and (self.thresholds or self.policy == "budget" or (self.none or 0) > 0
                                                or (self.fractions and len(self.fractions) == 2
                                                    and abs(sum(self.fractions) - 1) > 1e-9)):
            out.append("target transformers has no layer without attention: place softmax and swa layers only "
                       "(counts with none 0, or fractions that sum to 1)")
        if self.budget_measure not in ("kv", "decode"):
            out.append(f"budget_measure {self.budget_measure!r} must be kv or decode")
        if self.kind not in K.WINDOWED:
            out.append(f"kind {self.kind!r} must be one of {', '.join(K.WINDOWED)} (the windowed layers' kind)")
        if not isinstance(self.window, int) or isinstance(self.window, bool):
            out.append(f"window must be an integer, got {self.window!r}")
        elif self.window <= 0:
            out.append(f"window must be > 0, got {self.window}")
        return out


# A converted model keeps the window the original model applied to each layer here; `config.sliding_window`
# itself is then lifted (see `convert`).
NATIVE_WINDOW_KEY = "layerboost_native_sliding_window"


def native_window(config, layer_idx: int) -> int | None:
    """The sliding window the original model applies to this layer (Gemma 3's local layers; Mistral, Qwen2/3
    options), or None for full attention."""
    window = getattr(config, NATIVE_WINDOW_KEY, None) or getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None)
    if types is not None:
        return window if types[layer_idx] == "sliding_attention" else None
    if config.model_type == "mistral":
        return window
    return None


def native_plan(model_or_config) -> LayerPlan:
    """The original model as a plan: `swa` (its own window) where it already slides, `softmax` elsewhere."""
    config = getattr(model_or_config, "config", model_or_config)
    n = config.num_hidden_layers
    return LayerPlan(tuple(LayerSpec("swa", w) if (w := native_window(config, i)) else LayerSpec("softmax")
                           for i in range(n)))


def check_native(plan: LayerPlan, config) -> None:
    """A layer that already slides cannot become full attention, nor see further than its own window: the
    original weights never learned that (and `softmax` means "the original module, untouched").

    Raises:
        PlanError: naming each such layer and its native window.
    """
    _, bad = cap_to_native(plan, config)
    if bad:
        specs = [plan.layers[i] for i in bad]
        w = {native_window(config, i) for i in range(len(plan.layers))} - {None}
        raise PlanError(", ".join(f"layer {i} ({s.kind}{f' {s.window}' if s.window else ''})" for i, s in zip(bad, specs))
                        + f": the original model already attends to a sliding window of "
                        f"{'/'.join(map(str, sorted(w)))} tokens there; plan swa with that window (the layer as it is) "
                        "or less, linear_swa or none")


def cap_to_native(plan: LayerPlan, config) -> tuple[LayerPlan, list[int]]:
    """`plan` with every layer that asks for more than the original model gives (softmax, or a wider window,
    on a layer that already slides) set to the layer as it is (`swa` with its own window); and those layers."""
    native = native_plan(config).layers
    out, capped = [], []
    for i, (spec, nat) in enumerate(zip(plan.layers, native)):
        if nat.kind == "swa" and (spec.kind == "softmax" or K.KINDS[spec.kind].windowed and spec.window > nat.window):
            spec = LayerSpec("swa", nat.window) if spec.kind in ("softmax", "swa") else \
                LayerSpec(spec.kind, nat.window, spec.feature_dim, spec.mix)
            capped.append(i)
        out.append(spec)
    return LayerPlan(tuple(out)), capped


def kept_for_retrieval(retrieval: list[float] | None, k: int) -> list[int]:
    """The `k` layers of highest retrieval score (sensitivity.json's retrieval["alone"]), in layer order.

    Raises:
        PlanError: k > 0 and no retrieval signal.
    """
    if k and not retrieval:
        raise PlanError("keep_retrieval needs the retrieval signal: analyze with --retrieval")
    return sorted(sorted(range(len(retrieval)), key=lambda i: -retrieval[i])[:k]) if k else []


def make_plan(policy: PlanPolicy, scores, config=None, log=None, costs=None, speed=None, geometry=None,
              retrieval=None) -> LayerPlan:
    """The plan `policy` places from per-layer scores (higher = more sensitive), or for the speed policy from the
    window costs `costs` with the engine's `speed` model and cache `geometry` (speed.for_policy); `config` (the
    model's) is needed by the budget policy, and caps layers that slide natively at their own window (`cap_to_native`:
    on Gemma 3, a local layer ranked softmax stays as it is, swa 512). `retrieval`: per-layer retrieval scores
    (analyze --retrieval), for policy.keep_retrieval.

    Raises:
        PlanError: invalid policy settings, or settings the scores cannot satisfy.
    """
    if policy.problems():
        raise PlanError("invalid plan policy:\n  - " + "\n  - ".join(policy.problems()))
    p, w, k = policy, policy.window, policy.kind
    keep = kept_for_retrieval(retrieval, p.keep_retrieval)
    if TARGETS[p.target].attention_in_layer0 and len(scores):  # layer 0 keeps attention: rank it above every layer
        scores = [max(scores) + 1.0] + list(scores[1:])
    if keep and len(scores):  # the retrieving layers rank above every other
        top = max(scores) + 2.0
        scores = [top if i in keep else v for i, v in enumerate(scores)]

    if p.policy == "counts":
        plan = plan_by_counts(scores, p.softmax, p.swa, p.none, w, k)
    elif p.policy == "fractions":
        plan = plan_by_fractions(scores, p.fractions[0], p.fractions[1], w, k)
    elif p.policy == "thresholds":
        plan = plan_by_thresholds(scores, p.softmax_above, p.none_below, w, k)
    elif p.policy == "speed":
        if costs is None:
            raise PlanError("the speed policy places layers by window costs: analyze with --windows (e.g. 64,256,1024)")
        pick, _ = plan_by_target(costs, p, speed, geometry, config, retrieval)
        if log is not None:
            log(f"predicted: {pick.label()}, quality loss {pick.loss:.4f} (summed KL)"
                + (f", decode {pick.speedup:.2f}x the base's" if pick.speedup is not None else "")
                + f", KV {pick.kv:.3f}x at {p.context} tokens")
        plan = pick.plan
    elif config is None:
        raise PlanError("the budget policy needs the model's config (layer sizes)")
    else:
        plan = plan_by_budget(scores, config, p.budget, p.context, w, p.budget_measure, p.none_below, k)
    if config is not None:
        plan = _capped(plan, config, log)
    lost = [i for i in keep if plan.layers[i].kind != "softmax"]
    if lost:
        raise PlanError(f"keep_retrieval {p.keep_retrieval}: layers {lost} retrieve most but the policy placed them "
                        f"{plan.layers[lost[0]].kind}; allow at least {p.keep_retrieval} softmax layers")
    if keep and log is not None:
        log(f"softmax kept for retrieval in layers {keep} (analyze --retrieval)")
    problems = target_problems(plan, p.target)
    if problems:
        raise PlanError(f"the plan cannot run in {p.target}:\n  - " + "\n  - ".join(problems))
    return plan


def _capped(plan: LayerPlan, config, log) -> LayerPlan:
    plan, capped = cap_to_native(plan, config)
    if capped and log is not None:
        log(f"layers {capped} already slide in the original model (window "
            f"{'/'.join(str(native_window(config, i)) for i in capped[:1])}): kept as they are where the policy "
            "asked for more")
    return plan
