"""One way to name a dataset: what `--data`, `--unlabeled`, config files, labels.json and eval all use.

    mnist                       a registered dataset
    imagefolder:PATH            your own images (PATH/train/<class>/*, or PATH/<class>/*)
    mnist=HEAD                  (unlabeled datasets only) the head whose pseudo-labels it gets
    imagefolder:PATH=HEAD
    traffic:DIR[=HEAD]          (unlabeled only) the images a served model captured (serve --capture DIR)

`str(spec)` gives the text back, so a spec round-trips through configs and JSON. A spec's `name` is the
dataset's short name: the registry name, or an image folder's directory name. That name keys labels.json,
heads and manifests; the spec itself says where the images come from.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from transferkit.errors import DataError

IMAGEFOLDER = "imagefolder:"
TRAFFIC = "traffic:"


@dataclass(frozen=True)
class DatasetSpec:
    source: str  # a registry name, or `imagefolder:PATH`: what loads the images
    head: str | None = None  # for unlabeled datasets: the head (or a labelled dataset standing for it)

    @classmethod
    def parse(cls, text: str | DatasetSpec, with_head: bool = True) -> DatasetSpec:
        """`NAME`, `imagefolder:PATH`, and (with_head) either with `=HEAD`. Without `with_head` an `=` is
        part of the name or path, as it is for `--data`, where heads are planned from class names."""
        if isinstance(text, DatasetSpec):
            return text
        source, head = text, None
        if with_head:
            source, _, head = text.partition("=")
            head = head or None
        if not source:
            raise DataError(f"dataset {text!r} has no name; use a registered name or imagefolder:PATH")
        if source.startswith(IMAGEFOLDER) and not source[len(IMAGEFOLDER) :]:
            raise DataError("imagefolder: needs a path, e.g. imagefolder:./my_images")
        if source.startswith(TRAFFIC) and not source[len(TRAFFIC) :]:
            raise DataError("traffic: needs the folder serve --capture wrote, e.g. traffic:./captured")
        return cls(source, head)

    @property
    def path(self) -> str | None:
        """The image folder as given (None for a registered dataset or captured traffic)."""
        return self.source[len(IMAGEFOLDER) :] if self.source.startswith(IMAGEFOLDER) else None

    @property
    def traffic(self) -> str | None:
        """The capture folder of a `traffic:DIR` dataset as given (None for any other)."""
        return self.source[len(TRAFFIC) :] if self.source.startswith(TRAFFIC) else None

    @property
    def name(self) -> str:
        """`imagefolder:/data/flowers/` -> `flowers`, `traffic:/srv/captured` -> `traffic-captured`: a head and a
        manifest key, not a path."""
        if self.traffic is not None:
            return "traffic-" + (Path(self.traffic).expanduser().resolve().name or "root")
        if self.path is None:
            return self.source
        return Path(self.path).expanduser().resolve().name or "images"

    def resolved(self) -> DatasetSpec:
        """The same dataset with an absolute folder path, valid from any working directory."""
        if self.traffic is not None:
            return replace(self, source=f"{TRAFFIC}{Path(self.traffic).expanduser().resolve()}")
        if self.path is None:
            return self
        return replace(self, source=f"{IMAGEFOLDER}{Path(self.path).expanduser().resolve()}")

    def without_head(self) -> DatasetSpec:
        return replace(self, head=None)

    def __str__(self) -> str:
        return self.source + (f"={self.head}" if self.head else "")
