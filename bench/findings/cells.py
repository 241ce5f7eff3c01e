"""The grid's cells. A cell is one run: an experiment, a seed and a kind of condition, named
`<experiment>-s<seed>-<kind name>` (its folder under --keep and its record's file name). A kind
is a typed value; this module alone spells a kind as its name and parses the name back.

Kinds and their names:
    Labels(n)               labels-N                PPO at TARGET on a reward model trained first from N labels
    Labels(n, True)         distinct-labels-N       … from N labels of the saturating labeler (`<labeler>_distinct`)
    Ceiling()               ceiling                 PPO at TARGET on the labeler's own score
    KLSweep(t)              kl-T, kl-off            PPO at KL target T (None: no penalty) on the sweep's reward model
    KLSweep(t, True)        distinct-kl-T, …-off    … on the saturating labeler's sweep reward model
    Online(mode, rescaled)  online-MODE[-rescaled]  online labels (`normalize_on MODE`), kl_coef rescaled or not
"""

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import ClassVar

EXPERIMENTS = ("mock_sentiment", "mock_descriptiveness")
HORIZON = 640  # episodes: kl_coef can change by up to e^±2 over 6,400 episodes (1 ± 0.2 · 64/640 per update)
TARGET = 6.0  # the demo's KL target: label scaling and online cells
LABEL_COUNTS = (256, 512, 1024, 2048, 4096)
SWEEP_LABELS = 2048  # the reward model of the KL sweep, and the offline run of the online comparison
KL_TARGETS = (1.5, 3.0, 12.0, 24.0)  # and TARGET (the 2,048-label cell) and the penalty off
DISTINCT = "distinct-"  # the name prefix of the kinds whose labels come from the saturating labeler
DISTINCT_KL_TARGETS = (1.5, 24.0)  # their sweep: these, TARGET and the penalty off


@dataclass(frozen=True)
class Labels:
    """PPO at TARGET on a reward model trained first from `count` labels."""

    count: int
    distinct: bool = False  # the labels come from the saturating labeler

    @property
    def name(self) -> str:
        return f"{DISTINCT if self.distinct else ''}labels-{self.count}"


@dataclass(frozen=True)
class Ceiling:
    """PPO at TARGET on the labeler's own score (normalized as a reward model is)."""

    distinct: ClassVar[bool] = False
    name: ClassVar[str] = "ceiling"


@dataclass(frozen=True)
class KLSweep:
    """PPO at KL target `target` (None: the KL penalty off) on the sweep's reward model (the
    `Labels(SWEEP_LABELS)` cell's, of the saturating labeler with `distinct`)."""

    target: float | None
    distinct: bool = False

    @property
    def name(self) -> str:
        return f"{DISTINCT if self.distinct else ''}kl-{'off' if self.target is None else self.target}"


@dataclass(frozen=True)
class Online:
    """Online labels at TARGET, the reward normalized on the `current` or the `initial` policy,
    with kl_coef rescaled at each round (`rewards.online.rescale_kl_coef`) or not."""

    normalize_on: str
    rescaled: bool = False
    distinct: ClassVar[bool] = False

    @property
    def name(self) -> str:
        return f"online-{self.normalize_on}" + ("-rescaled" if self.rescaled else "")


Kind = Labels | Ceiling | KLSweep | Online

_NAMES: list[tuple[re.Pattern, Callable[[re.Match], Kind]]] = [
    (re.compile(r"(distinct-)?labels-(\d+)"), lambda m: Labels(int(m[2]), bool(m[1]))),
    (re.compile(r"ceiling"), lambda m: Ceiling()),
    (re.compile(r"(distinct-)?kl-(off|\d+\.\d+)"), lambda m: KLSweep(None if m[2] == "off" else float(m[2]),
                                                                     bool(m[1]))),
    (re.compile(r"online-(current|initial)(-rescaled)?"), lambda m: Online(m[1], bool(m[2]))),
]


def parse_kind(name: str) -> Kind:
    """The kind a name spells (only as `Kind.name` spells it: `kl-24.0`, not `kl-24`)."""
    for pattern, kind in _NAMES:
        if (match := pattern.fullmatch(name)) and kind(match).name == name:
            return kind(match)
    raise ValueError(f"unknown cell kind {name!r}")


_CELL_NAME = re.compile(r"(?P<experiment>[^-]+)-s(?P<seed>\d+)-(?P<kind>.+)")


@dataclass(frozen=True)
class Cell:
    """One run of the grid. Made from its kind's name (`Cell(e, seed, "kl-off")`, as the records and
    --kinds spell it) or from a kind (`Cell.of(e, seed, KLSweep(None))`); a name no kind spells is refused."""

    experiment: str
    seed: int
    kind: str  # the kind's name, as the records, the run folders and --kinds spell it
    spec: Kind = field(init=False, repr=False, compare=False)  # the kind, parsed from its name

    def __post_init__(self):
        object.__setattr__(self, "spec", parse_kind(self.kind))

    @classmethod
    def of(cls, experiment: str, seed: int, kind: Kind) -> "Cell":
        return cls(experiment, seed, kind.name)

    @classmethod
    def from_name(cls, name: str) -> "Cell":
        """The cell a name spells (a run folder's or a record's, without .json)."""
        match = _CELL_NAME.fullmatch(name)
        if match is None:
            raise ValueError(f"{name!r} is not a cell's name (<experiment>-s<seed>-<kind>)")
        return cls(match["experiment"], int(match["seed"]), match["kind"])

    @property
    def name(self) -> str:
        return f"{self.experiment}-s{self.seed}-{self.kind}"

    @property
    def labeler(self) -> str:
        return self.experiment.removeprefix("mock_")

    @property
    def distinct(self) -> bool:
        """Whether the cell's reward model learns from the saturating labeler (`<labeler>_distinct`)."""
        return self.spec.distinct

    @property
    def loads_sweep_model(self) -> bool:
        """Whether the run loads the weights of its sweep model's run (a KL-sweep cell)."""
        return isinstance(self.spec, KLSweep)

    def sweep_model(self) -> "Cell":
        """The cell whose reward model the KL sweep uses (and whose run is the offline run)."""
        return Cell.of(self.experiment, self.seed, Labels(SWEEP_LABELS, self.distinct))


# One seed's cells, most informative first (the experiments interleaved).
KINDS: tuple[str, ...] = tuple(kind.name for kind in (
    Labels(SWEEP_LABELS), Online("initial"), Ceiling(), Online("current"), Labels(256), KLSweep(None),
    Online("initial", rescaled=True), Online("current", rescaled=True), KLSweep(1.5), Labels(4096), KLSweep(24.0),
    Labels(512), Labels(1024), KLSweep(3.0), KLSweep(12.0),
    Labels(SWEEP_LABELS, True), KLSweep(None, True), KLSweep(24.0, True), KLSweep(1.5, True)))


def grid(seeds: Iterable[int], experiments: Iterable[str], kinds: Iterable[str] = KINDS) -> list[Cell]:
    """Every seed's cells in KINDS order, seed by seed."""
    return [Cell(e, seed, k) for seed in seeds for k in KINDS if k in kinds for e in experiments]


def sweep_kinds(distinct: bool = False) -> list[tuple[str, str]]:
    """(kind, KL target) of the KL sweep on the counting labeler's reward model, or on the saturating one's."""
    targets = sorted((*(DISTINCT_KL_TARGETS if distinct else KL_TARGETS), TARGET))
    kinds = [Labels(SWEEP_LABELS, distinct) if t == TARGET else KLSweep(t, distinct) for t in targets]
    return [(kind.name, f"{t:g}") for kind, t in zip(kinds, targets)] + [(KLSweep(None, distinct).name, "off")]


# The online comparison's kinds, with their titles in tables and plots.
ONLINE_KINDS = [(Labels(SWEEP_LABELS).name, "offline"), (Online("current").name, "online (`current`)"),
                (Online("current", True).name, "online (`current`), kl_coef rescaled"),
                (Online("initial").name, "online (`initial`)"),
                (Online("initial", True).name, "online (`initial`), kl_coef rescaled")]
