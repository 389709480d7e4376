"""Cluster names and colours: the user's mapping from cluster ids to cell types.

Q's clusters are numbers; a pathologist names them after looking at the gallery, in
``DIR/clusters.toml``::

    [clusters]
    1 = "myeloblast"
    4 = "myeloblast"
    0 = "lymphocyte"

Several ids may share a name (the paper found blasts split over two codes). Every report
(heatmaps, GeoJSON, gallery, classification) shows names where given and ``cluster j``
otherwise. Colours are the Okabe-Ito palette, distinguishable with the common colour-vision
deficiencies; ids sharing a name share a colour.
"""

from __future__ import annotations

from ..engine.results import CLUSTER_FILE, read_cluster_names
from ..errors import InvalidInputError

__all__ = [
    "CLUSTER_FILE",
    "OKABE_ITO",
    "cluster_colors",
    "cluster_label",
    "parse_cluster_selection",
    "read_cluster_names",
    "template_text",
]

#: Okabe & Ito (2008) colour-universal-design palette, black left out (RGB, 0-255).
OKABE_ITO: tuple[tuple[int, int, int], ...] = (
    (230, 159, 0),    # orange
    (86, 180, 233),   # sky blue
    (0, 158, 115),    # bluish green
    (240, 228, 66),   # yellow
    (0, 114, 178),    # blue
    (213, 94, 0),     # vermillion
    (204, 121, 167),  # reddish purple
    (153, 153, 153),  # grey
)


def cluster_label(j: int, names: dict[int, str]) -> str:
    """How reports print cluster ``j``: its name, or ``cluster j``; -1 is unclassified."""
    if j < 0:
        return "unclassified"
    return names.get(j, f"cluster {j}")


def cluster_colors(k: int, names: dict[int, str] | None = None) -> list[tuple[int, int, int]]:
    """One RGB colour per cluster id; ids with the same name (ignoring case) get the
    same colour."""
    names = names or {}
    by_label: dict[str, tuple[int, int, int]] = {}
    out = []
    for j in range(k):
        label = cluster_label(j, names).casefold()
        if label not in by_label:
            by_label[label] = OKABE_ITO[len(by_label) % len(OKABE_ITO)]
        out.append(by_label[label])
    return out


def parse_cluster_selection(text: str, k: int, names: dict[int, str] | None = None
                            ) -> list[int]:
    """Cluster ids from ``"1,4"`` or names (``"myeloblast"``) or a mix, checked against k.

    A name selects every id that carries it. Unknown ids or names raise
    :class:`InvalidInputError` listing what exists.
    """
    names = names or {}
    chosen: list[int] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        if part.lstrip("-").isdigit():
            j = int(part)
            if not 0 <= j < k:
                raise InvalidInputError(f"cluster {j} does not exist: the model has clusters "
                                        f"0..{k - 1}")
            ids = [j]
        else:
            ids = [j for j, n in names.items() if n.casefold() == part.casefold() and j < k]
            if not ids:
                known = ", ".join(sorted(set(names.values()))) or "none (write clusters.toml)"
                raise InvalidInputError(f"no cluster is named {part!r}; named: {known}")
        chosen.extend(i for i in ids if i not in chosen)
    if not chosen:
        raise InvalidInputError(f"no clusters selected in {text!r}")
    return sorted(chosen)


def template_text(k: int, shares: list[float] | None = None) -> str:
    """A commented ``clusters.toml`` for a run with ``k`` clusters, to be filled in."""
    lines = [
        "# Name the clusters after looking at gallery.png, then rerun the reports.",
        "# Several ids may share a name. Uncomment and edit, e.g.  1 = \"myeloblast\"",
        "[clusters]",
    ]
    for j in range(k):
        share = f"  # {shares[j]:.1%} of classified cells" if shares is not None else ""
        lines.append(f"# {j} = \"\"{share}")
    return "\n".join(lines) + "\n"
