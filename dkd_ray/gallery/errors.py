"""Bad input to indexing and search (one line, exit 2 at the entry points)."""

from dkd_ray.errors import InputError


class GalleryInputError(InputError, ValueError):
    """An unreadable image or video, a box outside its image, an empty input."""


class IndexMismatchError(InputError, ValueError):
    """An index built by another model (version) than the one searching it."""
