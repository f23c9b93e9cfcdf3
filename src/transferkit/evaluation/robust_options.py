"""What `transferkit eval --corruptions ... --attack ...` asks for, checked before any model or data loads.

    options = RobustnessOptions(corruptions="noise,fog", severities="1-3", attack="pgd", eps="1/255,4/255")
    options.corruption_names   # ('gaussian_noise', 'shot_noise', 'impulse_noise', 'fog')
    options.eps_values         # (0.00392..., 0.01568...)

The fields are the command's options (transferkit/options.py turns them into flags, their comments into help), so
the CLI and `transferkit.evaluate(run, corruptions=..., attack=...)` take the same words. Torch-free: the CLI
builds every parser at start-up, and the corruption names live here for the same reason (corruptions.py checks at
import that it implements exactly these).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from fractions import Fraction

from transferkit.errors import ConfigError
from transferkit.options import cli

# The common corruptions of Hendrycks & Dietterich (ICLR 2019, ImageNet-C / CIFAR-10-C), by family; names as the
# benchmark's files spell them, so results line up with published tables.
CORRUPTION_FAMILIES: dict[str, tuple[str, ...]] = {
    "noise": ("gaussian_noise", "shot_noise", "impulse_noise"),
    "blur": ("defocus_blur", "motion_blur", "zoom_blur", "gaussian_blur"),
    "weather": ("fog", "brightness", "contrast", "saturate"),
    "digital": ("jpeg_compression", "pixelate", "elastic_transform"),
}
CORRUPTIONS: tuple[str, ...] = tuple(name for names in CORRUPTION_FAMILIES.values() for name in names)
SEVERITIES: tuple[int, ...] = (1, 2, 3, 4, 5)
ATTACKS = ("fgsm", "pgd")
DEFAULT_EPS = "1/255,2/255,4/255"
DEFAULT_PGD_STEPS = 10


def _items(value: str | Sequence) -> list[str]:
    """A comma-separated string or a sequence (the Python API) -> stripped, non-empty items as text."""
    parts = value.split(",") if isinstance(value, str) else [str(v) for v in value]
    return [p.strip() for p in parts if p.strip()]


def parse_corruptions(value: str | Sequence[str]) -> tuple[str, ...]:
    """`all`, family names and corruption names, in any mix -> corruption names in the benchmark's order."""
    wanted: set[str] = set()
    for item in _items(value) or [""]:
        key = item.lower().replace("-", "_")
        if key == "all":
            wanted |= set(CORRUPTIONS)
        elif key in CORRUPTION_FAMILIES:
            wanted |= set(CORRUPTION_FAMILIES[key])
        elif key in CORRUPTIONS:
            wanted.add(key)
        else:
            raise ConfigError(
                f"--corruptions {item or '(empty)'!r}: not a corruption; use all, a family "
                f"({', '.join(CORRUPTION_FAMILIES)}) or names from: {', '.join(CORRUPTIONS)}"
            )
    return tuple(name for name in CORRUPTIONS if name in wanted)


def parse_severities(value: str | int | Sequence) -> tuple[int, ...]:
    """`1-5`, `3`, `1,3,5` (or ints) -> sorted distinct severities, each 1 to 5."""
    levels: set[int] = set()
    for item in _items([value] if isinstance(value, int) else value) or [""]:
        found = re.fullmatch(r"(\d+)(?:\s*-\s*(\d+))?", item)
        low, high = (int(found.group(1)), int(found.group(2) or found.group(1))) if found else (0, -1)
        if not found or low > high or low < SEVERITIES[0] or high > SEVERITIES[-1]:
            raise ConfigError(
                f"--severities {item or '(empty)'!r}: severities are whole numbers from 1 to 5, as a range or a "
                "list (1-5, 3, 1,3,5)"
            )
        levels |= set(range(low, high + 1))
    return tuple(sorted(levels))


def parse_eps(value: str | float | Sequence) -> tuple[float, ...]:
    """`1/255,2/255,0.01` (or numbers) -> perturbation budgets on the 0..1 pixel scale, in the order given."""
    budgets = []
    for item in _items([value] if isinstance(value, (int, float)) else value) or [""]:
        try:
            eps = float(Fraction(item.replace(" ", "")))
        except (ValueError, ZeroDivisionError):
            eps = float("nan")
        if not 0.0 <= eps <= 1.0:  # also refuses nan
            raise ConfigError(
                f"--eps {item or '(empty)'!r}: give budgets on the 0..1 pixel scale, as fractions or decimals "
                f"between 0 and 1 (e.g. {DEFAULT_EPS})"
            )
        budgets.append(eps)
    return tuple(dict.fromkeys(budgets))


@dataclass
class RobustnessOptions:
    """Robustness evaluation on top of the accuracy matrix (CLI: `transferkit eval --help`); all off by default."""

    # score every head on corrupted test images: all, a family (noise, blur, weather, digital) or corruption names
    corruptions: str | None = field(default=None, metadata=cli(metavar="all|FAMILY|NAME,...", default_text="off"))
    # with --corruptions: which severities, a range or a list
    severities: str | None = field(default=None, metadata=cli(metavar="1-5|N,...", default_text="1-5"))
    # with --corruptions: a run to compare with (a source-only model, say): corruption error relative to it
    reference: str | None = field(default=None, metadata=cli(metavar="RUN", default_text="none"))
    # white-box attack on the PyTorch model, then its images through each exported artifact
    attack: str | None = field(default=None, metadata=cli(choices=ATTACKS, default_text="off"))
    # with --attack: perturbation budgets (L-infinity) on the 0..1 pixel scale
    eps: str | None = field(default=None, metadata=cli(metavar="E,...", default_text=DEFAULT_EPS))
    # with --attack pgd: gradient steps per image
    pgd_steps: int | None = field(default=None, metadata=cli(metavar="N", type=int, default_text=DEFAULT_PGD_STEPS))
    # a seeded subset of this many test images per dataset for --corruptions and --attack
    robust_images: int = field(default=1000, metadata=cli(metavar="N"))
    # seeds the subset, the corruptions' noise and PGD's random start: the same seed gives the same images
    robust_seed: int = field(default=0, metadata=cli(metavar="SEED"))

    def __post_init__(self) -> None:
        if self.corruptions is None:
            given = [flag for flag, v in (("--severities", self.severities), ("--reference", self.reference)) if v]
            if given:
                raise ConfigError(f"{', '.join(given)}: only with --corruptions (all, a family or names)")
        if self.attack is None:
            given = [flag for flag, v in (("--eps", self.eps), ("--pgd-steps", self.pgd_steps)) if v is not None]
            if given:
                raise ConfigError(f"{', '.join(given)}: only with --attack {'|'.join(ATTACKS)}")
        elif self.attack not in ATTACKS:
            raise ConfigError(f"--attack {self.attack!r}: use one of {', '.join(ATTACKS)}")
        if self.attack == "fgsm" and self.pgd_steps is not None:
            raise ConfigError("--pgd-steps: FGSM takes one step; drop it or use --attack pgd")
        if self.pgd_steps is not None and self.pgd_steps < 1:
            raise ConfigError(f"--pgd-steps must be >= 1, got {self.pgd_steps}")
        if self.robust_images < 1:
            raise ConfigError(f"--robust-images must be >= 1 (test images per dataset), got {self.robust_images}")
        # parsed once here, so a bad value is refused before anything loads
        self.corruption_names = parse_corruptions(self.corruptions) if self.corruptions is not None else ()
        self.severity_levels = parse_severities(self.severities) if self.severities is not None else SEVERITIES
        self.eps_values = parse_eps(self.eps if self.eps is not None else DEFAULT_EPS) if self.attack else ()
        self.steps = 1 if self.attack == "fgsm" else self.pgd_steps or DEFAULT_PGD_STEPS

    @property
    def active(self) -> bool:
        return bool(self.corruption_names or self.attack)
