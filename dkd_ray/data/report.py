"""What the dataset readers and the validator record: a :class:`ValidationReport` of
:class:`Problem` rows, each naming the file and the row. Its own module so that the readers
(``cuhk_sysu``, ``prw``) and the validator that calls them both import it, not each other."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from .matlab import DatasetError

SEVERITIES = ("error", "warning")
SYNTHETIC_SIZES_FILE = "synthetic_image_sizes.json"  # written by the annotation-only generator

Progress = Callable[[str, int, int], None]  # (stage, done, total)


@dataclass(frozen=True)
class Problem:
    severity: str  # 'error' | 'warning'
    file: str  # relative to the dataset root when inside it
    where: str  # row or index: 'line 12', 'Img(5).box(2)', 'TestG50(7).Gallery(3)', '' = file
    message: str
    fatal: bool = False  # structural: the readers refuse to build annotations

    def __str__(self) -> str:
        location = f"{self.file}:{self.where}" if self.where else self.file
        return f"{self.severity.upper()} {location}: {self.message}"


@dataclass
class ValidationReport:
    dataset: str
    root: Path
    problems: list[Problem] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)

    def add(self, severity: str, file: str | Path, where: str, message: str, *,
            fatal: bool = False) -> None:
        if severity not in SEVERITIES:
            raise ValueError(f"severity must be one of {SEVERITIES}, got {severity!r}")
        self.problems.append(Problem(severity, self._relative(file), where, message, fatal))

    def add_dataset_error(self, exc: DatasetError) -> None:
        self.add("error", exc.file, "", exc.message, fatal=True)

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "error"]

    @property
    def warnings(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "warning"]

    @property
    def ok(self) -> bool:
        """True when training can start (warnings only)."""
        return not self.errors

    def raise_if_fatal(self) -> None:
        fatal = [p for p in self.problems if p.fatal]
        if fatal:
            first = fatal[0]
            more = f" (and {len(fatal) - 1} more structural problems; run "\
                   f"jobs/validate_dataset.py for the full list)" if len(fatal) > 1 else ""
            raise DatasetError(first.file, f"{first.where + ': ' if first.where else ''}"
                                           f"{first.message}{more}")

    def log_summary(self, logger: logging.Logger) -> None:
        """One warning line for a reader's own report (validation prints every problem)."""
        if self.problems:
            logger.warning(
                "%s: %d errors, %d warnings in the annotations (first: %s); run "
                "`python jobs/validate_dataset.py --dataset %s --data-root %s` for the full list",
                self.root, len(self.errors), len(self.warnings), self.problems[0], self.dataset,
                self.root)

    def format_summary(self) -> str:
        lines = [f"{self.dataset} at {self.root}:"]
        for key, value in self.summary.items():
            lines.append(f"  {key}: {value}")
        lines.append(f"  problems: {len(self.errors)} errors, {len(self.warnings)} warnings")
        return "\n".join(lines)

    def _relative(self, file: str | Path) -> str:
        try:
            return str(Path(file).resolve().relative_to(Path(self.root).resolve()))
        except (ValueError, OSError, RuntimeError):  # RuntimeError: a symlink loop (Python < 3.13)
            pass
        try:  # the path as written, when resolving it failed
            return str(Path(os.path.abspath(file)).relative_to(os.path.abspath(self.root)))
        except ValueError:
            return str(file)


# --- What is wrong with a path (folder shapes, links, permissions) --------------------------------

def path_problem(path: str | Path, *, folder: bool = False) -> tuple[Path, str] | None:
    """Why ``path`` cannot be read as a file (``folder``: listed as a folder): the path to blame
    (``path`` or the parent that is a file) and what is wrong, or None when it looks readable.
    Never raises; stat and access calls only, so it is cheap enough to run after any failure."""
    path = Path(path)
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        if os.path.islink(path):
            return path, "a symbolic link to a missing file"
        return path, "folder not found" if folder else "file not found"
    except NotADirectoryError:
        for parent in path.parents:
            try:
                if not stat.S_ISDIR(os.stat(parent).st_mode):
                    return parent, "a file where a folder should be"
            except OSError:
                continue
        return path, "a file stands where one of its folders should be"
    except OSError as exc:
        return path, describe_os_error(exc)
    if folder:
        if not stat.S_ISDIR(mode):
            return path, "a file where a folder should be"
        if not os.access(path, os.R_OK | os.X_OK):
            return path, "permission denied (the folder cannot be listed)"
        return None
    if stat.S_ISDIR(mode):
        return path, "a folder where a file should be"
    if not stat.S_ISREG(mode):
        return path, "not a regular file (a pipe, socket or device)"
    if not os.access(path, os.R_OK):
        return path, "permission denied"
    return None


def describe_os_error(exc: OSError) -> str:
    """An OSError met while reading a dataset path, in the words of :func:`path_problem`."""
    reasons = {
        errno.ELOOP: "a symbolic link loop",
        errno.EACCES: "permission denied",
        errno.EPERM: "permission denied",
        errno.EISDIR: "a folder where a file should be",
        errno.ENOTDIR: "a file where a folder should be (in its path)",
        errno.ENOENT: "file not found",
    }
    return reasons.get(exc.errno) or f"cannot be read: {type(exc).__name__}: {exc}"


@contextlib.contextmanager
def reading(path: str | Path, *, folder: bool = False) -> Iterator[None]:
    """Around a reader's read of ``path``: a :class:`DatasetError` that is really about the path
    (a folder where the file should be, a file where its folder should be, a symlink loop,
    permission denied) is raised again with that reason; OSErrors become DatasetErrors."""
    try:
        yield
    except DatasetError as exc:
        problem = path_problem(path, folder=folder)
        if problem is None:
            raise
        raise DatasetError(*problem) from exc
    except OSError as exc:
        blame, reason = path_problem(path, folder=folder) or (path, describe_os_error(exc))
        raise DatasetError(blame, reason) from exc
