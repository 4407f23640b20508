"""Online experiments: a traffic split over served models, with optional exploration.

A request for an experiment's name goes to one arm (model, version, signature), chosen
by hashing the user id with the experiment's salt: a user sees the same arm on every
request, and a new salt reshuffles users for the next test. An arm may explore: on a
share of requests it serves a random ordering, or an order-keeping random subsample, of
its top `pool` items instead of its top k, so every pooled item has a known, non-zero
propensity and another ranking can be evaluated from the logs (IPS).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
from typing import Any, Dict, List, Mapping, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import yaml

USER_INPUT = "user_id"  # the input hashed to pick an arm
K_INPUT = "k"  # the input setting the list length; exploration widens it to the pool
ITEM_OUTPUT = "item_ids"  # the list output; outputs of its width are re-ordered with it
ARM_OUTPUT = "experiment_arm"  # added to every experiment response: the arm served


class ExperimentError(ValueError):
    """An experiments file or a request to an experiment is invalid."""


class Draw(NamedTuple):
    """What `Exploration.choose` served for a batch of rows.

    Attributes:
      index: [rows, kmax] positions in the pool shown, -1 past a row's list.
      propensity: [rows, kmax] probability of each shown item at its position.
      explored: [rows] the row got any exploration (not the model's top k).
      randomized: [rows] the row's order was drawn uniformly at random (the lists that
        measure position bias).
    """

    index: np.ndarray
    propensity: np.ndarray
    explored: np.ndarray
    randomized: np.ndarray


@functools.lru_cache(maxsize=512)
def subsample_positions(n: int, shown: int, keep: float) -> np.ndarray:
    """P(the pool's i-th item lands at list position j) for a subsampled list.

    The list walks the pool best first and keeps each item with probability `keep`
    until `shown` are kept; an item is kept surely when the rest of the pool is just
    enough to fill the list. A dynamic programme over how many were kept so far gives
    exact propensities; it depends on (n, shown, keep) only, so it is cached.

    Args:
      n: valid items in the pool.
      shown: list length (<= n).
      keep: probability of keeping an item, in (0, 1].

    Returns:
      Read-only float64 [n, shown]; each column sums to 1.
    """
    out = np.zeros((n, shown))
    kept = np.zeros(shown + 1)  # P(c items kept before item i), c = 0..shown
    kept[0] = 1.0
    need = shown - np.arange(shown + 1)
    for i in range(n):
        p = np.where(n - i <= need, 1.0, keep)
        p[shown] = 0.0  # the list is full
        out[i] = kept[:shown] * p[:shown]
        moved = kept * p
        kept = kept - moved
        kept[1:] += moved[:-1]
    out.flags.writeable = False
    return out


@dataclasses.dataclass(frozen=True)
class Exploration:
    """Randomised lists among the model's top `pool`, with exact propensities.

    Two kinds, mixed with the model's own top k: with probability `epsilon` a uniformly
    random ordering of the pool (every item equally likely at every position: what
    measures position bias), with probability `subsample` a subsample that keeps the
    model's order (each pooled item kept with probability `keep`, best first, until
    the list is full). Subsampled lists cost the shopper less and show the items just
    below the top k far more often, which is what another ranker of the same
    candidates mostly promotes: its off-policy estimate gets smaller weights.

    Args:
      epsilon: Share of requests shown a uniformly random ordering, in [0, 1].
      pool: Items the exploration draws from (the model is asked for max(k, pool)).
      subsample: Share of requests shown an order-keeping subsample, in [0, 1].
      keep: Probability of keeping each pooled item in a subsample, in (0, 1].

    Raises:
      ExperimentError: a share or probability out of range, shares summing over 1, or
        exploration with a pool of fewer than 2 items.
    """

    epsilon: float = 0.0
    pool: int = 0
    subsample: float = 0.0
    keep: float = 0.5

    def __post_init__(self):
        for name in ("epsilon", "subsample"):
            if not 0.0 <= float(getattr(self, name)) <= 1.0:
                raise ExperimentError(f"exploration {name} must be in [0, 1], got "
                                      f"{getattr(self, name)}")
        if self.epsilon + self.subsample > 1.0 + 1e-9:
            raise ExperimentError(f"exploration epsilon + subsample must be <= 1, got "
                                  f"{self.epsilon} + {self.subsample}")
        if not 0.0 < float(self.keep) <= 1.0:
            raise ExperimentError(f"exploration keep must be in (0, 1], got {self.keep}")
        if int(self.pool) < 0:
            raise ExperimentError(f"exploration pool must be >= 0, got {self.pool}")
        if self.active and int(self.pool) < 2:
            raise ExperimentError(f"exploration (epsilon {self.epsilon}, subsample "
                                  f"{self.subsample}) needs a pool of >= 2 items, got "
                                  f"{self.pool}")

    @property
    def active(self) -> bool:
        return self.epsilon > 0 or self.subsample > 0

    def _greedy(self) -> float:
        return max(0.0, 1.0 - self.epsilon - self.subsample)

    def choose(self, item_ids: np.ndarray, k: np.ndarray, rng: np.random.Generator) -> Draw:
        """Positions of the pool to show per row and their propensities.

        Args:
          item_ids: [rows, width] pooled ids, best first ("" pads missing items).
          k: [rows] items each row asked for.
          rng: Randomness of the exploration draws.

        Returns:
          A `Draw`; propensities are exact under the mixture of the three kinds.
        """
        rows, width = item_ids.shape
        kmax = int(min(width, max(1, int(np.max(k)) if len(k) else 1)))
        index = np.full((rows, kmax), -1, dtype=np.int64)
        propensity = np.zeros((rows, kmax), dtype=np.float32)
        explored = np.zeros(rows, dtype=bool)
        randomized = np.zeros(rows, dtype=bool)
        valid = (item_ids != b"") & (item_ids != "")
        for row in range(rows):
            n = int(valid[row].sum())  # valid items come first (top-k order)
            shown = min(int(k[row]), n, kmax)
            if shown <= 0:
                continue
            draw = rng.random()
            if draw < self.epsilon:
                randomized[row] = True
                picked = rng.permutation(n)[:shown]
            elif draw < self.epsilon + self.subsample:
                picked = self._subsample(n, shown, rng)
            else:
                picked = np.arange(shown)
            explored[row] = draw < self.epsilon + self.subsample
            index[row, :shown] = picked
            at = np.arange(shown)
            propensity[row, :shown] = (self._greedy() * (picked == at) + self.epsilon / n
                                       + self.subsample * self._subsampled(n, shown)[picked, at])
        return Draw(index, propensity, explored, randomized)

    def _subsample(self, n: int, shown: int, rng: np.random.Generator) -> np.ndarray:
        draws = rng.random(n)
        kept: List[int] = []
        for i in range(n):
            if len(kept) == shown:
                break
            if n - i <= shown - len(kept) or draws[i] < self.keep:
                kept.append(i)
        return np.asarray(kept, dtype=np.int64)

    def _subsampled(self, n: int, shown: int) -> np.ndarray:
        if self.subsample <= 0:
            return np.zeros((n, shown))
        return subsample_positions(n, shown, float(self.keep))

    def inclusion(self, index: np.ndarray, item_ids: np.ndarray,
                  k: np.ndarray) -> np.ndarray:
        """Probability that each shown item is in its row's list at all, any position.

        greedy * [d is among the policy's top `shown`] + epsilon * shown / n + subsample *
        P(a subsample keeps d): far larger than the per-position propensity, so an
        estimator that may credit an item at another position (a position-bias model)
        weighs logged lists much less.

        Args:
          index: [rows, kmax] pool positions shown, from `choose` (-1 past a list).
          item_ids: [rows, width] the pooled ids `choose` drew from.
          k: [rows] items each row asked for.

        Returns:
          float32 [rows, kmax], 0 past a row's list.
        """
        valid = (item_ids != b"") & (item_ids != "")
        n = valid.sum(axis=1)
        shown = np.minimum(np.minimum(k, n), index.shape[1])
        greedy = (index >= 0) & (index < shown[:, None])
        share = np.where(n > 0, shown / np.maximum(n, 1), 0.0)[:, None]
        value = self._greedy() * greedy + self.epsilon * share
        if self.subsample > 0:
            for row in range(index.shape[0]):
                at = index[row] >= 0
                if shown[row] > 0 and at.any():
                    kept = self._subsampled(int(n[row]), int(shown[row])).sum(axis=1)
                    value[row, at] += self.subsample * kept[index[row, at]]
        return np.where(index >= 0, value, 0.0).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class Arm:
    """One variant of an experiment.

    Args:
      name: Arm name reported in responses and logs.
      model: Served model name.
      signature: Signature to call.
      share: Share of users routed here, in (0, 1].
      version: Pinned model version; None serves the latest.
      inputs: Default values of signature inputs a request may leave out (one value per
        row; lists for 2-D inputs), e.g. {"exclude_item_ids": [""]}.
      exploration: Randomised ordering for off-policy evaluation of other rankings.
    """

    name: str
    model: str
    signature: str = "serving_default"
    share: float = 0.5
    version: Optional[int] = None
    inputs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    exploration: Exploration = Exploration()


@dataclasses.dataclass(frozen=True)
class Experiment:
    """A traffic split: requests for `name` go to one arm per user.

    Args:
      name: Model name clients send requests to.
      arms: The variants; shares sum to 1.
      salt: Mixed into the user hash; change it to re-randomise users.
    """

    name: str
    arms: Tuple[Arm, ...]
    salt: str = ""

    def __post_init__(self):
        if not self.name:
            raise ExperimentError("an experiment needs a name (the model name clients call)")
        if not self.arms:
            raise ExperimentError(f"experiment {self.name!r} has no arms")
        names = [a.name for a in self.arms]
        if len(set(names)) != len(names):
            raise ExperimentError(f"experiment {self.name!r} has duplicate arm names {names}")
        for arm in self.arms:
            if not 0.0 < float(arm.share) <= 1.0:
                raise ExperimentError(f"arm {arm.name!r} of experiment {self.name!r}: share "
                                      f"must be in (0, 1], got {arm.share}")
        total = sum(float(a.share) for a in self.arms)
        if abs(total - 1.0) > 1e-6:
            raise ExperimentError(f"arm shares of experiment {self.name!r} sum to {total:g}, "
                                  f"not 1")

    def bucket(self, user_id: str) -> float:
        """The user's position in [0, 1), fixed by salt and user id."""
        digest = hashlib.sha256(f"{self.salt}\0{user_id}".encode("utf-8")).digest()
        return int.from_bytes(digest[:8], "big") / 2.0 ** 64

    def arm_for(self, user_id: str) -> Arm:
        """The arm serving `user_id` (the same one on every request)."""
        point, edge = self.bucket(user_id), 0.0
        for arm in self.arms:
            edge += float(arm.share)
            if point < edge:
                return arm
        return self.arms[-1]  # float rounding of the last edge


def _arm(raw: Mapping[str, Any], experiment: str) -> Arm:
    where = f"experiment {experiment!r}"
    if not isinstance(raw, Mapping):
        raise ExperimentError(f"{where}: each arm must be a mapping, got {raw!r}")
    known = {f.name for f in dataclasses.fields(Arm)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ExperimentError(f"{where}: unknown arm field(s) {unknown}; known: {sorted(known)}")
    for field in ("name", "model"):
        if not raw.get(field):
            raise ExperimentError(f"{where}: every arm needs a {field!r}")
    values = dict(raw)
    explore = values.pop("exploration", None) or {}
    known_explore = {f.name for f in dataclasses.fields(Exploration)}
    if not isinstance(explore, Mapping) or set(explore) - known_explore:
        raise ExperimentError(f"{where} arm {raw['name']!r}: exploration takes "
                              f"{sorted(known_explore)}, got {explore!r}")
    inputs = values.pop("inputs", None) or {}
    if not isinstance(inputs, Mapping):
        raise ExperimentError(f"{where} arm {raw['name']!r}: inputs must be a mapping of "
                              f"input name -> default value")
    try:
        return Arm(**values, inputs=dict(inputs),
                   exploration=Exploration(
                       float(explore.get("epsilon", 0.0)), int(explore.get("pool", 0)),
                       float(explore.get("subsample", 0.0)), float(explore.get("keep", 0.5))))
    except (TypeError, ValueError) as e:
        raise ExperimentError(f"{where} arm {raw['name']!r}: {e}") from None


def parse_experiments(raw: Any, source: str = "experiments") -> Dict[str, Experiment]:
    """Experiments from the parsed YAML: {"experiments": [{name, salt, arms: [...]}]}.

    Raises:
      ExperimentError: a missing or invalid field, named with its experiment and arm.
    """
    if not isinstance(raw, Mapping) or not isinstance(raw.get("experiments"), list):
        raise ExperimentError(f"{source}: expected a mapping with an 'experiments' list")
    experiments: Dict[str, Experiment] = {}
    for entry in raw["experiments"]:
        if not isinstance(entry, Mapping):
            raise ExperimentError(f"{source}: each experiment must be a mapping, got {entry!r}")
        unknown = sorted(set(entry) - {"name", "salt", "arms"})
        if unknown:
            raise ExperimentError(f"{source}: experiment {entry.get('name')!r} has unknown "
                                  f"field(s) {unknown}; known: arms, name, salt")
        name = str(entry.get("name") or "")
        arms = entry.get("arms")
        if not isinstance(arms, list):
            raise ExperimentError(f"{source}: experiment {name!r} needs an 'arms' list")
        experiment = Experiment(name, tuple(_arm(a, name) for a in arms),
                                str(entry.get("salt", "")))
        if name in experiments:
            raise ExperimentError(f"{source}: experiment {name!r} is defined twice")
        experiments[name] = experiment
    return experiments


def load_experiments(path: str) -> Tuple[Dict[str, Experiment], Dict[str, str]]:
    """Reads an experiments YAML file.

    Returns:
      (name -> Experiment, model name -> base path from its optional `models:` mapping,
      relative paths resolved against the file's directory).

    Raises:
      FileNotFoundError: no such file.
      ExperimentError: invalid content.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"experiments file {path!r} does not exist")
    with open(path, encoding="utf-8") as f:
        try:
            raw = yaml.safe_load(f)
        except yaml.YAMLError as e:
            raise ExperimentError(f"experiments file {path!r} is not valid YAML: {e}") from None
    experiments = parse_experiments(raw, path)
    models = raw.get("models") or {}
    if not isinstance(models, Mapping):
        raise ExperimentError(f"{path}: 'models' must map model name -> base path")
    here = os.path.dirname(os.path.abspath(path))
    paths = {str(name): os.path.normpath(os.path.join(here, str(base)))
             for name, base in models.items()}
    return experiments, paths


def check_models(experiments: Mapping[str, Experiment], served: Sequence[str]) -> None:
    """Every arm's model is served and no experiment hides a model of the same name.

    Raises:
      ExperimentError: naming the experiment and arm.
    """
    for experiment in experiments.values():
        if experiment.name in served:
            raise ExperimentError(f"experiment {experiment.name!r} has the name of a served "
                                  f"model; give it its own name")
        for arm in experiment.arms:
            if arm.model not in served:
                raise ExperimentError(
                    f"arm {arm.name!r} of experiment {experiment.name!r} uses model "
                    f"{arm.model!r}, which is not served (served: {sorted(served)})")


def describe(experiments: Mapping[str, Experiment],
             versions: Mapping[str, List[int]]) -> List[str]:
    """One log line per experiment: arms with model, served version, signature, share."""
    lines = []
    for experiment in experiments.values():
        arms = []
        for arm in experiment.arms:
            live = versions.get(arm.model) or []
            version = arm.version if arm.version is not None else (max(live) if live else None)
            e = arm.exploration
            explore = (f", explore eps={e.epsilon:g} subsample={e.subsample:g} keep={e.keep:g} "
                       f"pool={e.pool}" if e.active else "")
            arms.append(f"{arm.name}: {arm.model}/{version if version is not None else 'none'}"
                        f"/{arm.signature} {arm.share:.0%}{explore}")
        lines.append(f"experiment {experiment.name} (salt {experiment.salt!r}): "
                     + "; ".join(arms))
    return lines
