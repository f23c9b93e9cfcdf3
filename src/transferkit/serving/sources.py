"""Where the versions a server may serve come from: a list of stored model tags, or a repository folder.

    transferkit serve RUN [RUN ...]      each run's stored model; model name and version from its tag
                                         (transferkit-mnist:3xk2 -> model transferkit-mnist, version 3xk2)
    transferkit serve DIR                a repository, re-read every --poll-s seconds:
        DIR/<run>/export/manifest.json             a model named by its run's tag, the tag's version
        DIR/<model>/<version>/export/manifest.json  model <model>, version <version> (a run folder, or a link
                                                    to one); versions order by number where they are numbers

A version is always a stored BentoML model (the export puts it in the store); the folders only name it. What
the workers are told (TRANSFERKIT_MODEL) is the list form, `name:version=tag` entries separated by commas, so
the served name and version need not be the tag's. Needs no BentoML and no torch.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from transferkit.errors import ConfigError, TransferkitError
from transferkit.manifest import MANIFEST_NAME, read_manifest

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")  # names and versions: safe in a URL path segment


@dataclass(frozen=True)
class VersionSource:
    name: str  # the model's name, as clients ask for it
    version: str
    tag: str  # the stored BentoML model that holds this version's artifacts

    def entry(self) -> str:
        return f"{self.name}:{self.version}={self.tag}"


def check_name(kind: str, value: str) -> str:
    if not _NAME.match(value):
        raise ConfigError(
            f"{kind} {value[:80]!r} is not a valid name: use letters, digits, '.', '_' or '-' (at most 128), "
            "starting with a letter or digit"
        )
    return value


def from_tag(tag: str) -> VersionSource:
    name, _, version = tag.partition(":")
    return VersionSource(check_name("model name", name), check_name("version", version or "latest"), tag)


def parse_sources(text: str) -> list[VersionSource]:
    """TRANSFERKIT_MODEL -> sources: comma-separated `tag` or `name:version=tag` entries."""
    out: list[VersionSource] = []
    for raw in text.split(","):
        entry = raw.strip()
        if not entry:
            continue
        served, sep, tag = entry.partition("=")
        if not sep:
            out.append(from_tag(entry))
            continue
        name, _, version = served.partition(":")
        out.append(VersionSource(check_name("model name", name), check_name("version", version), tag.strip()))
    seen: set[tuple[str, str]] = set()
    for s in out:
        if (s.name, s.version) in seen:
            raise ConfigError(f"model {s.name!r} version {s.version!r} is listed twice; list each version once")
        seen.add((s.name, s.version))
    return out


def format_sources(sources: list[VersionSource]) -> str:
    return ",".join(s.entry() for s in sources)


def run_list(run_dirs: str | Path | list[str | Path] | tuple[str | Path, ...]) -> list[Path]:
    """One run folder or several (`serve`, `build`) -> their paths."""
    return [Path(p) for p in run_dirs] if isinstance(run_dirs, (list, tuple)) else [Path(run_dirs)]


def is_run(path: Path) -> bool:
    return (path / "export" / MANIFEST_NAME).is_file()


def run_source(run_dir: Path, name: str | None = None, version: str | None = None) -> VersionSource:
    """An exported run's stored model as a version (its tag's name and version unless given)."""
    tag = read_manifest(run_dir / "export").tag
    if not tag:
        raise TransferkitError(f"{run_dir}: the export was not saved to the BentoML model store; re-run the export")
    found = from_tag(tag)
    return VersionSource(name or found.name, check_name("version", version) if version else found.version, tag)


def _version_order(name: str) -> tuple[int, int, str]:
    return (0, int(name), "") if name.isdigit() else (1, 0, name)


def scan_repository(root: Path) -> tuple[list[VersionSource], dict[str, str]]:
    """The versions a repository folder holds, oldest first within each model (the newest is served by
    default), and {folder: why it is not a version} for what it holds besides."""
    sources: list[VersionSource] = []
    skipped: dict[str, str] = {}
    for child in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        try:
            if is_run(child):
                sources.append(run_source(child))
                continue
            versions = sorted(
                (p for p in child.iterdir() if p.is_dir() and is_run(p)), key=lambda p: _version_order(p.name)
            )
            if not versions:
                skipped[child.name] = "neither an exported run nor a folder of exported runs (<model>/<version>/)"
            for v in versions:
                try:
                    sources.append(run_source(v, check_name("model name", child.name), v.name))
                except TransferkitError as exc:
                    skipped[f"{child.name}/{v.name}"] = str(exc)
        except (TransferkitError, OSError) as exc:
            skipped[child.name] = str(exc)
    return sources, skipped


def is_repository(path: Path) -> bool:
    """A folder that holds exported runs (DIR/<run>/ or DIR/<model>/<version>/) and is not a run itself."""
    if not path.is_dir() or is_run(path) or (path / "export").is_dir():
        return False
    children = [c for c in path.iterdir() if c.is_dir()]
    return any(is_run(c) or any(is_run(g) for g in c.iterdir() if g.is_dir()) for c in children)


def sources_for_paths(paths: list[Path]) -> tuple[list[VersionSource], Path | None]:
    """`serve` arguments -> (the versions, the repository folder to poll or None). One folder that holds runs
    is a repository; otherwise every argument must be an exported run."""
    if len(paths) == 1 and is_repository(paths[0]):
        sources, skipped = scan_repository(paths[0])
        if not sources:
            why = "; ".join(f"{k}: {v}" for k, v in skipped.items()) or "it is empty"
            raise TransferkitError(f"{paths[0]} holds no exported run ({why})")
        return sources, paths[0]
    sources = []
    for path in paths:
        if not is_run(path):
            raise TransferkitError(
                f"{path} is not an exported run (no export/{MANIFEST_NAME}); run `transferkit export {path}` first, "
                "or give one repository folder"
            )
        sources.append(run_source(path))
    parse_sources(format_sources(sources))  # refuses the same version listed twice
    return sources, None
