"""Cell models of the synthetic marrow: cell types, the slide specification
(:class:`SlideSpec`, re-exported by :mod:`.synth`), seeded placement and nuclear shapes.

Everything here is a deterministic function of position. Cells sit on a jittered hexagonal
lattice whose sites are drawn in fixed blocks of ``LATTICE_BLOCK x LATTICE_BLOCK`` sites,
each block from its own generator seeded by ``(seed, block row, block column)``; fat vacuoles
come from a coarser grid the same way. Any window of the slide can therefore be generated
alone, and gives the same cells as any other window that covers them: this is what lets
tiles be rendered independently (streaming, Dask) and the truth table be built without
rendering anything.

Nuclear shapes are star-shaped polar curves ``R(theta)`` (an ellipse, perturbed by random
harmonics, optionally notched into a kidney) or unions of such lobes (segmented neutrophils,
multilobed megakaryocytes), in the spirit of the random perturbed polygons with blurred
boundaries that Hou et al. use to build initial synthetic patches. A pixel's *depth*
``R(theta) - rho`` is positive inside a shape; soft edges come from a smoothstep of depth.

References
----------
.. [1] L. Hou et al., "Robust histopathology image analysis: to label or to synthesize?",
   CVPR 2019.
.. [2] T. Hu et al., "Unsupervised cell classification in bone marrow whole-slide images
   using InfoGAN with Wasserstein loss" (the method slidecensus implements).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from scipy.spatial import cKDTree

from ..errors import InvalidInputError

# ---------------------------------------------------------------------------------------
# Hashing and position-deterministic noise
# ---------------------------------------------------------------------------------------

_M1 = np.uint64(0x9E3779B97F4A7C15)
_M2 = np.uint64(0xBF58476D1CE4E5B9)
_M3 = np.uint64(0x94D049BB133111EB)
_MASK64 = (1 << 64) - 1


def _as_u64(a: np.ndarray) -> np.ndarray:
    return np.asarray(a, dtype=np.int64).view(np.uint64)


def hash_uniform(seed: int, salt: int, ix: np.ndarray, iy: np.ndarray) -> np.ndarray:
    """Uniform [0, 1) float64 from integer lattice coordinates (broadcast), splitmix-style."""
    key = np.uint64(((seed * 0x2545F4914F6CDD1D) ^ (salt * 0x632BE59BD9B4E019)) & _MASK64)
    h = (_as_u64(ix) * _M1) ^ ((_as_u64(iy) + key) * _M2) ^ key
    h ^= h >> np.uint64(30)
    h *= _M2
    h ^= h >> np.uint64(27)
    h *= _M3
    h ^= h >> np.uint64(31)
    return (h >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def value_noise(seed: int, salt: int, x0: int, y0: int, w: int, h: int,
                scale_px: float) -> np.ndarray:
    """Smooth value noise in [-1, 1] on the pixel grid of a level-0 window (float32).

    Lattice values are hashed from absolute lattice coordinates and interpolated with a
    smoothstep, separably, so the value of a pixel does not depend on the window asked for:
    tiles rendered apart join without seams.
    """
    xs = (np.arange(x0, x0 + w, dtype=np.float64)) / scale_px
    ys = (np.arange(y0, y0 + h, dtype=np.float64)) / scale_px
    ix = np.floor(xs).astype(np.int64)
    iy = np.floor(ys).astype(np.int64)
    fx = xs - ix
    fy = ys - iy
    sx = (fx * fx * (3.0 - 2.0 * fx)).astype(np.float32)
    sy = (fy * fy * (3.0 - 2.0 * fy)).astype(np.float32)
    ix0, iy0 = int(ix[0]), int(iy[0])
    gx = np.arange(ix0, int(ix[-1]) + 2)
    gy = np.arange(iy0, int(iy[-1]) + 2)
    lattice = (hash_uniform(seed, salt, gx[None, :], gy[:, None]) * 2.0 - 1.0).astype(
        np.float32)
    cx = ix - ix0
    cy = iy - iy0
    along_x = lattice[:, cx] * (1.0 - sx) + lattice[:, cx + 1] * sx
    return along_x[cy] * (1.0 - sy)[:, None] + along_x[cy + 1] * sy[:, None]


def value_noise_points(seed: int, salt: int, x: np.ndarray, y: np.ndarray,
                       scale_px: float) -> np.ndarray:
    """:func:`value_noise` evaluated at arbitrary points (float64)."""
    xs = np.asarray(x, dtype=np.float64) / scale_px
    ys = np.asarray(y, dtype=np.float64) / scale_px
    ix = np.floor(xs).astype(np.int64)
    iy = np.floor(ys).astype(np.int64)
    fx = xs - ix
    fy = ys - iy
    sx = fx * fx * (3.0 - 2.0 * fx)
    sy = fy * fy * (3.0 - 2.0 * fy)

    def v(a, b):
        return hash_uniform(seed, salt, a, b) * 2.0 - 1.0

    top = v(ix, iy) * (1 - sx) + v(ix + 1, iy) * sx
    bottom = v(ix, iy + 1) * (1 - sx) + v(ix + 1, iy + 1) * sx
    return top * (1 - sy) + bottom * sy


# ---------------------------------------------------------------------------------------
# Cell types
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CellType:
    """Look of one cell type; lengths in µm, stain amounts in optical-density units.

    The parameters encode the cues Hu et al. use to tell marrow cells apart: nuclear size,
    roundness vs segmentation, chromatin density (``chroma``) and openness (``fine``
    texture, nuclear ``rim``, nucleoli), and the colour of the cytoplasm.
    """

    name: str
    nucleated: bool
    nuc_r_um: tuple[float, float] = (0.0, 0.0)   # radius of the (each) lobe
    aspect: tuple[float, float] = (1.0, 1.0)     # ellipse aspect of the lobe
    harm: float = 0.0                            # amplitude of random harmonics
    notch: tuple[float, float] = (0.0, 0.0)      # kidney indentation depth (fraction)
    lobes: tuple[int, int] = (1, 1)              # number of lobes
    eccentric: float = 0.0                       # nucleus offset, fraction of free room
    body_um: tuple[float, float] = (0.0, 0.0)    # cell body radius
    chroma: float = 0.0                          # hematoxylin density of chromatin
    nuc_eosin: float = 0.0
    fine: float = 0.0                            # fine chromatin stippling amplitude
    coarse: float = 0.0                          # chromatin clumping amplitude
    rim: float = 0.0                             # nuclear-membrane darkening
    nucleoli: tuple[int, int] = (0, 0)
    cyto_h: float = 0.0
    cyto_e: float = 0.0
    granular: float = 0.0


CELL_TYPES: tuple[CellType, ...] = (
    CellType("myeloblast", True, nuc_r_um=(5.8, 7.0), aspect=(1.0, 1.15), harm=0.04,
             eccentric=0.3, body_um=(7.6, 8.8), chroma=1.0, nuc_eosin=0.30, fine=0.45,
             coarse=0.12, rim=0.55, nucleoli=(1, 2), cyto_h=0.32, cyto_e=0.28,
             granular=0.05),
    CellType("myelocyte", True, nuc_r_um=(4.2, 5.0), aspect=(1.15, 1.45), harm=0.05,
             eccentric=0.6, body_um=(7.0, 8.2), chroma=1.25, nuc_eosin=0.35, fine=0.25,
             coarse=0.3, rim=0.35, cyto_h=0.09, cyto_e=0.36, granular=0.45),
    CellType("neutrophil", True, nuc_r_um=(2.2, 2.7), harm=0.10, lobes=(2, 5),
             eccentric=0.2, body_um=(5.6, 6.6), chroma=1.75, nuc_eosin=0.4, fine=0.1,
             coarse=0.2, rim=0.1, cyto_h=0.08, cyto_e=0.36, granular=0.4),
    CellType("monocyte", True, nuc_r_um=(5.3, 6.2), aspect=(1.1, 1.35), harm=0.05,
             notch=(0.3, 0.5), eccentric=0.3, body_um=(8.0, 9.4), chroma=1.2,
             nuc_eosin=0.3, fine=0.3, coarse=0.25, rim=0.3, cyto_h=0.34, cyto_e=0.20,
             granular=0.1),
    CellType("lymphocyte", True, nuc_r_um=(3.2, 3.9), aspect=(1.0, 1.12), harm=0.04,
             eccentric=0.2, body_um=(4.0, 4.8), chroma=1.95, nuc_eosin=0.35, fine=0.1,
             coarse=0.25, rim=0.15, cyto_h=0.30, cyto_e=0.18),
    CellType("normoblast", True, nuc_r_um=(2.6, 3.3), aspect=(1.0, 1.06), harm=0.02,
             eccentric=0.2, body_um=(4.6, 5.6), chroma=2.3, nuc_eosin=0.3, fine=0.05,
             coarse=0.1, rim=0.05, cyto_h=0.12, cyto_e=0.40),
    CellType("megakaryocyte", True, nuc_r_um=(5.0, 7.0), harm=0.06, lobes=(4, 8),
             body_um=(18.0, 23.0), chroma=1.3, nuc_eosin=0.35, fine=0.2, coarse=0.3,
             rim=0.2, cyto_h=0.08, cyto_e=0.62, granular=0.3),
    CellType("red_cell", False, body_um=(3.4, 4.0), cyto_h=0.04, cyto_e=0.80),
)
"""All cell types; ``red_cell`` is anucleate (pale pink disc with central pallor)."""

TYPE_NAMES: tuple[str, ...] = tuple(t.name for t in CELL_TYPES)
NUCLEATED_TYPES: tuple[str, ...] = tuple(t.name for t in CELL_TYPES if t.nucleated)
_CODE = {name: i for i, name in enumerate(TYPE_NAMES)}
RBC = _CODE["red_cell"]
MEGA = _CODE["megakaryocyte"]
NEUT = _CODE["neutrophil"]

MAX_LOBES = 8
LATTICE_BLOCK = 16
_NU = 48  # uniforms drawn per lattice site (fixed, so the stream never depends on type)
_SALT_SITES, _SALT_FAT, _SALT_TISSUE, _SALT_FATDENS = 11, 12, 13, 14
FAT_R_UM = (18.0, 42.0)
FAT_GRID_UM = 160.0
NEUTROPHIL_SPACING = 1.15  # lobe centre spacing / lobe radius (visible constrictions)


def type_table(attr: str) -> np.ndarray:
    """A per-type-code array of one :class:`CellType` attribute (float32)."""
    return np.array([getattr(t, attr) for t in CELL_TYPES], dtype=np.float32)


def max_body_um() -> float:
    return max(t.body_um[1] for t in CELL_TYPES)


def max_nucleus_extent_um(include_mega: bool = False) -> float:
    ext = []
    for t in CELL_TYPES:
        if not t.nucleated or (t.name == "megakaryocyte" and not include_mega):
            continue
        if t.lobes[1] > 1 and t.name == "neutrophil":
            r = t.nuc_r_um[1] * (1 + t.harm)
            ext.append(r * (1 + NEUTROPHIL_SPACING * (t.lobes[1] - 1) / 2))
        else:
            ext.append(t.nuc_r_um[1] * math.sqrt(t.aspect[1]) * (1 + 2 * t.harm)
                       + t.eccentric * (t.body_um[1] - t.nuc_r_um[0]))
    if include_mega:
        m = CELL_TYPES[MEGA]
        ext.append(9.0 + m.nuc_r_um[1] * (1 + 2 * m.harm))
    return max(ext)


# ---------------------------------------------------------------------------------------
# The slide specification (what synth.py renders; kept here so that the cell models
# need nothing from the renderer)
# ---------------------------------------------------------------------------------------

# Ruifrok & Johnston optical-density vectors (rows: R, G, B absorbance), as in
# skimage.color.rgb_from_hed.
RUIFROK_H = (0.65, 0.70, 0.29)
RUIFROK_E = (0.07, 0.99, 0.11)
RUIFROK_RESIDUAL = (0.27, 0.57, 0.78)
# The H and E vectors of bone-marrow H&E as Macenko's method finds them on the Kainz et al.
# images (median over the 8 images of ../shared/data/bone-marrow-he; spread about ±0.02):
# the same hues as Ruifrok's, with the bluer, more purple eosin of marrow sections.
MARROW_H = (0.62, 0.69, 0.37)
MARROW_E = (0.21, 0.88, 0.42)

NORMAL_MIX: dict[str, float] = {
    "myeloblast": 0.02, "myelocyte": 0.30, "neutrophil": 0.24, "monocyte": 0.05,
    "lymphocyte": 0.13, "normoblast": 0.255, "megakaryocyte": 0.005,
}
"""A normal adult marrow, roughly: few blasts, maturing myeloid and erythroid cells."""

ABNORMAL_MIX: dict[str, float] = {
    "myeloblast": 0.30, "myelocyte": 0.22, "neutrophil": 0.14, "monocyte": 0.06,
    "lymphocyte": 0.12, "normoblast": 0.155, "megakaryocyte": 0.005,
}
"""A blast-rich marrow (acute-leukaemia-like, 30% blasts)."""


def _check_mix(mix: Mapping[str, float], what: str) -> dict[str, float]:
    bad = [k for k in mix if k not in NUCLEATED_TYPES]
    if bad:
        raise InvalidInputError(f"{what}: unknown cell types {bad}; expected some of "
                                f"{list(NUCLEATED_TYPES)}")
    vals = {k: float(v) for k, v in mix.items()}
    if any(v < 0 or not math.isfinite(v) for v in vals.values()) or sum(vals.values()) <= 0:
        raise InvalidInputError(f"{what}: fractions must be >= 0 with a positive sum, got "
                                f"{vals}")
    total = sum(vals.values())
    if abs(total - 1.0) < 1e-9:  # already normalised: keep the exact values (round trips)
        return vals
    return {k: v / total for k, v in vals.items()}


@dataclass(frozen=True)
class Region:
    """An ellipse (or rectangle) of the slide, in level-0 px, with its own cell mix.

    Sites inside take their type from ``mix`` instead of the slide's; when regions overlap
    the later one wins. ``name`` is carried into the truth table's ``region`` column only
    as its index in :attr:`SlideSpec.regions`.
    """

    x: float
    y: float
    w: float
    h: float
    mix: Mapping[str, float]
    shape: str = "ellipse"
    name: str = "hotspot"

    def __post_init__(self) -> None:
        if self.shape not in ("ellipse", "rect"):
            raise InvalidInputError(f"region shape must be 'ellipse' or 'rect', got "
                                    f"{self.shape!r}")
        if not (self.w > 0 and self.h > 0):
            raise InvalidInputError(f"region size must be positive, got {self.w}x{self.h}")
        object.__setattr__(self, "mix", _check_mix(self.mix, f"region {self.name!r}"))

    def contains(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Whether level-0 points (x, y) lie inside (vectorised)."""
        u = (np.asarray(x) - self.x) / self.w
        v = (np.asarray(y) - self.y) / self.h
        if self.shape == "rect":
            return (u >= 0) & (u < 1) & (v >= 0) & (v < 1)
        return (u - 0.5) ** 2 + (v - 0.5) ** 2 < 0.25


@dataclass(frozen=True)
class StainSpec:
    """One slide's stain: H, E and residual OD vectors (unit rows), amounts, illuminant."""

    h: tuple[float, float, float] = MARROW_H
    e: tuple[float, float, float] = MARROW_E
    residual: tuple[float, float, float] = RUIFROK_RESIDUAL
    h_scale: float = 1.0
    e_scale: float = 1.0
    background: tuple[float, float, float] = (244.0, 242.0, 246.0)

    @classmethod
    def random(cls, rng: np.random.Generator, spread: float = 1.0) -> StainSpec:
        """A stain drawn around :data:`MARROW_H`, :data:`MARROW_E`: each vector tilted
        by a few degrees, H and E amounts scaled by up to ±25%, and the illuminant tinted,
        so that two slides of one cohort differ as much as two staining runs do."""
        def tilt(v):
            a = np.asarray(v) / np.linalg.norm(v) + rng.normal(0, 0.05 * spread, 3)
            a = np.abs(a)
            return tuple(float(c) for c in a / np.linalg.norm(a))

        bg = 244.0 + rng.uniform(-6, 5) * spread + rng.normal(0, 2 * spread, 3)
        return cls(h=tilt(MARROW_H), e=tilt(MARROW_E), residual=tilt(RUIFROK_RESIDUAL),
                   h_scale=float(1 + rng.uniform(-0.25, 0.25) * spread),
                   e_scale=float(1 + rng.uniform(-0.25, 0.25) * spread),
                   background=tuple(float(np.clip(c, 200, 255)) for c in bg))

    def matrix(self) -> np.ndarray:
        """(3, 3) float32: rows are the H, E, residual OD vectors scaled by their amount."""
        m = np.array([self.h, self.e, self.residual], np.float64)
        m /= np.linalg.norm(m, axis=1, keepdims=True)
        m[0] *= self.h_scale
        m[1] *= self.e_scale
        return m.astype(np.float32)


@dataclass(frozen=True)
class SlideSpec:
    """Everything that fixes a synthetic slide; equal specs give identical slides.

    Parameters
    ----------
    seed : non-negative integer seeding every random choice of the slide.
    height, width : level-0 size in pixels.
    mpp : µm per pixel of level 0 (cells keep their physical size at any mpp).
    mix : fractions of nucleated cell types (normalised), see :data:`NORMAL_MIX`.
    regions : areas with their own mix (e.g. a blast-rich hotspot).
    stain : the slide's stain; see :meth:`StainSpec.random`.
    spacing_um : spacing of the hexagonal lattice that cells are placed on.
    cellularity : fraction of lattice sites that hold a cell (before fat).
    fat_fraction : about this fraction of the tissue is fat vacuoles.
    rbc_fraction : fraction of occupied sites holding an anucleate red cell.
    tissue : ``"core"`` (a noisy ellipse of tissue on glass) or ``"full"``.
    label : cohort label (``normal`` / ``abnormal``), carried into the cohort CSV.
    slide_id : name of the slide's files.
    """

    seed: int
    height: int
    width: int
    mpp: float = 0.5
    mix: Mapping[str, float] = field(default_factory=lambda: dict(NORMAL_MIX))
    regions: tuple[Region, ...] = ()
    stain: StainSpec = field(default_factory=StainSpec)
    spacing_um: float = 11.5
    cellularity: float = 0.93
    fat_fraction: float = 0.3
    rbc_fraction: float = 0.12
    tissue: str = "core"
    label: str = ""
    slide_id: str = "synthetic"

    def __post_init__(self) -> None:
        if not (isinstance(self.seed, int | np.integer) and self.seed >= 0):
            raise InvalidInputError(f"seed must be a non-negative integer, got {self.seed!r}")
        if int(self.height) < 1 or int(self.width) < 1:
            raise InvalidInputError(f"slide size must be positive, got "
                                    f"{self.height}x{self.width} (h x w)")
        if not (0.05 <= self.mpp <= 5):
            raise InvalidInputError(f"mpp must be in [0.05, 5] µm/px, got {self.mpp}")
        if self.tissue not in ("core", "full"):
            raise InvalidInputError(f"tissue must be 'core' or 'full', got {self.tissue!r}")
        if not (4 <= self.spacing_um <= 50):
            raise InvalidInputError(f"spacing_um must be in [4, 50], got {self.spacing_um}")
        for name in ("cellularity", "fat_fraction", "rbc_fraction"):
            v = getattr(self, name)
            if not (0 <= v <= 1):
                raise InvalidInputError(f"{name} must be in [0, 1], got {v}")
        object.__setattr__(self, "seed", int(self.seed))
        object.__setattr__(self, "height", int(self.height))
        object.__setattr__(self, "width", int(self.width))
        object.__setattr__(self, "mix", _check_mix(self.mix, "mix"))
        object.__setattr__(self, "regions", tuple(self.regions))

    @property
    def shape(self) -> tuple[int, int]:
        """(height, width) of level 0."""
        return (self.height, self.width)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict; :meth:`from_dict` inverts it."""
        d = asdict(self)
        d["mix"] = dict(self.mix)
        d["regions"] = [dict(asdict(r), mix=dict(r.mix)) for r in self.regions]
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SlideSpec:
        """Rebuild a spec from :meth:`to_dict` output."""
        d = dict(d)
        d["regions"] = tuple(Region(**r) for r in d.get("regions", ()))
        st = dict(d.get("stain", {}))
        d["stain"] = StainSpec(**{k: tuple(v) if isinstance(v, list) else v
                                  for k, v in st.items()})
        return cls(**d)


def site_margin_px(spec: SlideSpec) -> float:
    """How far outside a window cells can still change what the window shows, in px.

    A cell drawn in the window is at most one body radius away; its survival depends on
    megakaryocytes up to two megakaryocyte bodies away, and its size on neighbours up to
    two nuclear extents away.
    """
    body = max_body_um()
    return (body + 2 * CELL_TYPES[MEGA].body_um[1] + 2 * max_nucleus_extent_um()
            + spec.spacing_um) / spec.mpp + 4


# ---------------------------------------------------------------------------------------
# Fat vacuoles
# ---------------------------------------------------------------------------------------


def fat_vacuoles(spec: SlideSpec, x0: float, y0: float, x1: float, y1: float
                 ) -> dict[str, np.ndarray]:
    """Fat vacuoles whose disc may reach the window [x0, x1) x [y0, y1) (level-0 px).

    Vacuoles are drawn per cell of a coarse grid, with a Poisson count whose mean is
    modulated by smooth noise (fat is patchy) and set so that about ``spec.fat_fraction``
    of the tissue is covered.
    """
    g = FAT_GRID_UM / spec.mpp
    rmax = FAT_R_UM[1] * 1.3 / spec.mpp
    lo, hi = FAT_R_UM
    mean_area = math.pi * (lo * lo + lo * hi + hi * hi) / 3.0
    frac = min(max(spec.fat_fraction, 0.0), 0.95)
    lam = -math.log(1.0 - frac) * FAT_GRID_UM**2 / mean_area if frac > 0 else 0.0
    gi0, gi1 = math.floor((y0 - rmax) / g), math.floor((y1 + rmax) / g)
    gj0, gj1 = math.floor((x0 - rmax) / g), math.floor((x1 + rmax) / g)
    out: dict[str, list] = {k: [] for k in ("x", "y", "r", "a2", "p2", "a3", "p3", "a4",
                                            "p4")}
    if lam <= 0:
        return {k: np.zeros(0) for k in out}
    for gi in range(gi0, gi1 + 1):
        for gj in range(gj0, gj1 + 1):
            rng = np.random.default_rng([spec.seed, _SALT_FAT, gi + (1 << 30),
                                         gj + (1 << 30)])
            dens = 1.0 + 0.9 * value_noise_points(spec.seed, _SALT_FATDENS,
                                                  np.array([gj + 0.5]),
                                                  np.array([gi + 0.5]), 3.0)[0]
            n = int(rng.poisson(lam * max(dens, 0.05)))
            u = rng.random((max(n, 1), 9))[:n]
            out["x"].append((gj + u[:, 0]) * g)
            out["y"].append((gi + u[:, 1]) * g)
            out["r"].append((lo + (hi - lo) * np.sqrt(u[:, 2])) / spec.mpp)
            for k, (a, p) in zip((2, 3, 4), ((3, 4), (5, 6), (7, 8)), strict=True):
                out[f"a{k}"].append((u[:, a] - 0.5) * (0.16 if k == 2 else 0.08))
                out[f"p{k}"].append(u[:, p] * 2 * np.pi)
    res = {k: np.concatenate(v) if v else np.zeros(0) for k, v in out.items()}
    keep = ((res["x"] + res["r"] * 1.3 > x0) & (res["x"] - res["r"] * 1.3 < x1)
            & (res["y"] + res["r"] * 1.3 > y0) & (res["y"] - res["r"] * 1.3 < y1))
    return {k: v[keep] for k, v in res.items()}


def fat_depth(vac: dict[str, np.ndarray], i: int, dx: np.ndarray, dy: np.ndarray
              ) -> np.ndarray:
    """Depth (px, positive inside) of vacuole ``i`` at offsets from its centre (float32)."""
    dx = np.asarray(dx, np.float32)
    dy = np.asarray(dy, np.float32)
    rho = np.sqrt(dx * dx + dy * dy) + np.float32(1e-4)
    z = (dx + 1j * dy).astype(np.complex64) / rho   # e^{i theta}
    z2 = z * z
    r = np.float32(1.0)
    for k, zk in ((2, z2), (3, z2 * z), (4, z2 * z2)):
        ph = np.complex64(np.exp(1j * vac[f"p{k}"][i]))
        r = r + np.float32(vac[f"a{k}"][i]) * (zk * ph).real
    return np.float32(vac["r"][i]) * r - rho


# ---------------------------------------------------------------------------------------
# Sites
# ---------------------------------------------------------------------------------------


def tissue_value(spec: SlideSpec, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Signed tissue field at points: > 0 inside the tissue (a noisy ellipse, or all)."""
    if spec.tissue == "full":
        return np.ones(np.shape(x))
    h, w = spec.height, spec.width
    u = (np.asarray(x) - w / 2) / (0.48 * w)
    v = (np.asarray(y) - h / 2) / (0.48 * h)
    scale = max(h, w) / 4.0
    return 1.0 - (u * u + v * v) + 0.12 * value_noise_points(spec.seed, _SALT_TISSUE, x, y,
                                                             scale)


def _lattice_geometry(spec: SlideSpec) -> tuple[float, float]:
    s = spec.spacing_um / spec.mpp
    return s, s * math.sqrt(3.0) / 2.0


def _draw_blocks(spec: SlideSpec, i0: int, i1: int, j0: int, j1: int
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Lattice indices, ids and uniforms of all sites with i in [i0, i1), j in [j0, j1)."""
    b = LATTICE_BLOCK
    s, _ = _lattice_geometry(spec)
    n_bj = math.ceil(spec.width / (b * s)) + 2
    ii_all, jj_all, id_all, u_all = [], [], [], []
    if i1 <= i0 or j1 <= j0:
        z = np.zeros(0, np.int64)
        return z, z, z, np.zeros((0, _NU))
    loc_i, loc_j = np.divmod(np.arange(b * b), b)
    for bi in range(i0 // b, (i1 - 1) // b + 1):
        for bj in range(j0 // b, (j1 - 1) // b + 1):
            rng = np.random.default_rng([spec.seed, _SALT_SITES, bi, bj])
            u = rng.random((b * b, _NU))
            ii = bi * b + loc_i
            jj = bj * b + loc_j
            keep = (ii >= i0) & (ii < i1) & (jj >= j0) & (jj < j1)
            ii_all.append(ii[keep])
            jj_all.append(jj[keep])
            id_all.append((bi * n_bj + bj) * (b * b) + np.arange(b * b)[keep] + 1)
            u_all.append(u[keep])
    if not ii_all:
        z = np.zeros(0, np.int64)
        return z, z, z, np.zeros((0, _NU))
    return (np.concatenate(ii_all), np.concatenate(jj_all), np.concatenate(id_all),
            np.concatenate(u_all))


def _polar_radius(c: np.ndarray, s: np.ndarray, asp, phi_c, phi_s, a2, p2c, p2s, a3, p3c,
                  p3s, nd, ntc, nts) -> np.ndarray:
    """R(theta) of a lobe for unit direction (c, s) = (cos, sin) of theta (broadcast)."""
    u = c * phi_c + s * phi_s          # direction in the lobe frame
    v = -c * phi_s + s * phi_c
    ra = np.sqrt(asp)
    re = 1.0 / np.sqrt((u / ra) ** 2 + (v * ra) ** 2)
    cos2 = u * u - v * v
    sin2 = 2 * u * v
    cos3 = u * (4 * u * u - 3)
    sin3 = v * (3 - 4 * v * v)
    h = 1 + a2 * (cos2 * p2c - sin2 * p2s) + a3 * (cos3 * p3c - sin3 * p3s)
    r = re * h
    if np.any(nd):
        cosd = u * ntc + v * nts
        r = r * (1 - nd * np.exp((cosd - 1) * 6.0))
    return r


_LOBE_FIELDS = ("lx", "ly", "lr", "lasp", "lphi", "la2", "lp2", "la3", "lp3")


def lobe_depth(cells: dict[str, np.ndarray], k: int, sel: np.ndarray, dx: np.ndarray,
               dy: np.ndarray) -> np.ndarray:
    """Depth of lobe ``k`` of cells ``sel`` at absolute-offset grids dx, dy (n, P, P).

    dx, dy are pixel positions minus the lobe centre.
    """
    def col(name):
        return cells[name][sel, k][:, None, None]

    rho = np.sqrt(dx * dx + dy * dy) + np.float32(1e-4)
    c = dx / rho
    s = dy / rho
    phi = col("lphi")
    p2 = col("lp2")
    p3 = col("lp3")
    nd = cells["notch"][sel][:, None, None] if k == 0 else np.float32(0)
    nt = cells["notch_t"][sel][:, None, None] if k == 0 else np.float32(0)
    r = _polar_radius(c, s, col("lasp"), np.cos(phi), np.sin(phi), col("la2"), np.cos(p2),
                      np.sin(p2), col("la3"), np.cos(p3), np.sin(p3), nd, np.cos(nt),
                      np.sin(nt))
    return col("lr") * r - rho


def _lobe_area_centroid(cells: dict[str, np.ndarray], k: int, sel: np.ndarray
                        ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Area (px^2) and centroid offset of lobe k by quadrature of R(theta)."""
    t = np.linspace(0, 2 * np.pi, 128, endpoint=False)[None, :]
    c, s = np.cos(t), np.sin(t)

    def col(name):
        return cells[name][sel, k][:, None].astype(np.float64)

    phi, p2, p3 = col("lphi"), col("lp2"), col("lp3")
    nd = cells["notch"][sel][:, None] if k == 0 else 0.0
    nt = cells["notch_t"][sel][:, None] if k == 0 else 0.0
    r = col("lr") * _polar_radius(c, s, col("lasp"), np.cos(phi), np.sin(phi), col("la2"),
                                  np.cos(p2), np.sin(p2), col("la3"), np.cos(p3),
                                  np.sin(p3), nd, np.cos(nt), np.sin(nt))
    dt = 2 * np.pi / t.shape[1]
    area = 0.5 * (r**2).sum(1) * dt
    mx = ((r**3) * c).sum(1) * dt / 3 / area
    my = ((r**3) * s).sum(1) * dt / 3 / area
    return area, mx, my


def generate_sites(spec: SlideSpec, x0: float, y0: float, x1: float, y1: float
                   ) -> dict[str, np.ndarray]:
    """Every cell whose lattice site lies near the window, in its final state.

    Returns a dict of arrays, one row per present cell: ``id``, ``type`` (code into
    :data:`CELL_TYPES`), ``region``, cell centre ``x``, ``y``, body shape, nucleus lobes
    (``lx``, ``ly``, ... of shape (n, MAX_LOBES); ``nlobes``), nucleoli and the nucleus
    centre ``ncx``, ``ncy``. A cell's state depends only on cells within
    :func:`site_margin_px` of it, so callers keep cells whose centre lies at least that
    far inside the window they asked for.
    """
    s, dy = _lattice_geometry(spec)
    mpp = spec.mpp
    i0 = max(0, math.floor(y0 / dy) - 1)
    i1 = min(math.ceil(spec.height / dy) + 1, math.ceil(y1 / dy) + 2)
    j0 = max(0, math.floor(x0 / s) - 1)
    j1 = min(math.ceil(spec.width / s) + 2, math.ceil(x1 / s) + 2)
    ii, jj, ids, u = _draw_blocks(spec, i0, max(i1, i0), j0, max(j1, j0))
    jit = 0.32
    x = (jj + 0.5 + 0.5 * (ii & 1)) * s + (u[:, 0] - 0.5) * 2 * jit * s
    y = (ii + 0.5) * dy + (u[:, 1] - 0.5) * 2 * jit * dy
    inside = (x >= 0) & (x < spec.width) & (y >= 0) & (y < spec.height)
    inside &= (x >= x0) & (x < x1) & (y >= y0) & (y < y1)
    inside &= u[:, 2] < spec.cellularity
    x, y, ids, u = x[inside], y[inside], ids[inside], u[inside]
    if len(x):
        keep = tissue_value(spec, x, y) > 0.03  # clear of the faded tissue edge
        x, y, ids, u = x[keep], y[keep], ids[keep], u[keep]

    # --- type, from the mix of the region holding the site -----------------------------
    n = len(x)
    region = np.full(n, -1, np.int16)
    for k, reg in enumerate(spec.regions):
        region[reg.contains(x, y)] = k
    tcode = np.empty(n, np.int16)
    mixes = [spec.mix] + [r.mix for r in spec.regions]
    for k, mix in enumerate(mixes):
        sel = region == k - 1
        names = [t for t in NUCLEATED_TYPES if mix.get(t, 0) > 0]
        p = np.array([mix[t] for t in names], float)
        cum = np.cumsum(p / p.sum())
        pick = np.minimum(np.searchsorted(cum, u[sel, 3], side="right"), len(names) - 1)
        tcode[sel] = np.array([_CODE[t] for t in names], np.int16)[pick]
    tcode[u[:, 4] < spec.rbc_fraction] = RBC

    # --- body --------------------------------------------------------------------------
    blo = type_table("body_um")  # shape (T, 2)
    body_r = (blo[tcode, 0] + (blo[tcode, 1] - blo[tcode, 0]) * u[:, 6]) / mpp

    # --- fat suppresses cells inside vacuoles -------------------------------------------
    vac = fat_vacuoles(spec, x0, y0, x1, y1)
    present = np.ones(n, bool)
    for i in range(len(vac["x"])):
        near = np.abs(x - vac["x"][i]) < vac["r"][i] * 1.3 + body_r
        near &= np.abs(y - vac["y"][i]) < vac["r"][i] * 1.3 + body_r
        idx = np.flatnonzero(near)
        if len(idx):
            d = fat_depth(vac, i, x[idx] - vac["x"][i], y[idx] - vac["y"][i])
            present[idx[d > -0.6 * body_r[idx]]] = False

    # --- megakaryocytes clear the space they need ----------------------------------------
    mk = np.flatnonzero(present & (tcode == MEGA))
    if len(mk):
        prio = u[:, 5]
        tree = cKDTree(np.column_stack([x, y]))
        reach = body_r[mk] + 0.6 * float(body_r.max())
        for m, idx in zip(mk, tree.query_ball_point(np.column_stack([x[mk], y[mk]]), reach),
                          strict=True):
            idx = np.asarray(idx, dtype=np.int64)
            d = np.hypot(x[idx] - x[m], y[idx] - y[m])
            near = idx[(d < body_r[m] + 0.6 * body_r[idx]) & present[idx] & (idx != m)]
            if np.any(prio[near[tcode[near] == MEGA]] > prio[m]):
                continue  # yields to a stronger megakaryocyte; others stay decided below
            present[near[tcode[near] != MEGA]] = False
        # second pass: megakaryocytes yield to stronger megakaryocytes nearby
        for m in mk:
            d = np.hypot(x[mk] - x[m], y[mk] - y[m])
            rival = (d < body_r[mk] + body_r[m]) & (prio[mk] > prio[m])
            if np.any(rival):
                present[m] = False

    sel = np.flatnonzero(present)
    x, y, ids, u, tcode, region, body_r = (a[sel] for a in (x, y, ids, u, tcode, region,
                                                               body_r))
    n = len(x)
    cells: dict[str, Any] = {
        "id": ids.astype(np.int64), "type": tcode, "region": region, "x": x, "y": y,
        "body_r": body_r.astype(np.float32),
        "body_asp": (1.0 + 0.18 * u[:, 7]).astype(np.float32),
        "body_phi": (u[:, 8] * np.pi).astype(np.float32),
        "body_a2": ((u[:, 9] - 0.5) * 0.12).astype(np.float32),
        "body_p2": (u[:, 10] * 2 * np.pi).astype(np.float32),
        "nlobes": np.zeros(n, np.int16),
        "notch": np.zeros(n, np.float32), "notch_t": np.zeros(n, np.float32),
        "nl_x": np.zeros((n, 2)), "nl_y": np.zeros((n, 2)),
        "nl_r": np.zeros((n, 2), np.float32),
        "ncx": x.copy(), "ncy": y.copy(),
    }
    for f in _LOBE_FIELDS:
        cells[f] = np.zeros((n, MAX_LOBES), np.float64 if f in ("lx", "ly") else np.float32)
    cells["lasp"][:] = 1.0
    _shape_nuclei(spec, cells, u)
    _shrink_crowded(spec, cells)
    return cells


def _shape_nuclei(spec: SlideSpec, cells: dict[str, Any], u: np.ndarray) -> None:
    """Fill nucleus geometry per type from each site's own uniforms (vectorised)."""
    mpp = spec.mpp
    tcode = cells["type"]
    for code, t in enumerate(CELL_TYPES):
        sel = np.flatnonzero(tcode == code)
        if not t.nucleated or len(sel) == 0:
            continue
        us = u[sel]
        m = len(sel)
        r = (t.nuc_r_um[0] + (t.nuc_r_um[1] - t.nuc_r_um[0]) * us[:, 11]) / mpp
        asp = t.aspect[0] + (t.aspect[1] - t.aspect[0]) * us[:, 12]
        phi = us[:, 13] * np.pi
        body = cells["body_r"][sel]
        # nucleus centre: eccentric within the body
        room = np.maximum(body - r * np.sqrt(asp), 0) * t.eccentric * np.sqrt(us[:, 20])
        ang = us[:, 21] * 2 * np.pi
        ncx = cells["x"][sel] + room * np.cos(ang)
        ncy = cells["y"][sel] + room * np.sin(ang)
        nl = np.full(m, 1, np.int16)
        if t.lobes[1] > 1:
            nl = (t.lobes[0] + np.floor(us[:, 22] * (t.lobes[1] - t.lobes[0] + 1))).astype(
                np.int16)
            nl = np.minimum(nl, t.lobes[1])
        lx = np.zeros((m, MAX_LOBES))
        ly = np.zeros((m, MAX_LOBES))
        lr = np.zeros((m, MAX_LOBES))
        if code == NEUT:
            # a chain of equal lobes along a gentle arc, centred on the nucleus centre
            turn = us[:, 23] * np.deg2rad(150)
            head = us[:, 24] * 2 * np.pi
            step = turn / np.maximum(nl - 1, 1)
            px = np.zeros(m)
            py = np.zeros(m)
            d = NEUTROPHIL_SPACING * r
            for k in range(MAX_LOBES):
                on = k < nl
                lx[on, k] = px[on]
                ly[on, k] = py[on]
                lr[on, k] = r[on]
                hk = head - turn / 2 + k * step
                px = px + d * np.cos(hk)
                py = py + d * np.sin(hk)
            cnt = nl.astype(float)
            mx = np.where(np.arange(MAX_LOBES) < nl[:, None], lx, 0).sum(1) / cnt
            my = np.where(np.arange(MAX_LOBES) < nl[:, None], ly, 0).sum(1) / cnt
            lx -= mx[:, None]
            ly -= my[:, None]
        elif code == MEGA:
            # overlapping lobes clustered around the centre
            for k in range(MAX_LOBES):
                on = k < nl
                a = us[:, 32 + k] * 2 * np.pi
                rad = (2.0 + 6.0 * np.sqrt(us[:, 40 + k])) / mpp
                lx[on, k] = (rad * np.cos(a))[on]
                ly[on, k] = (rad * np.sin(a))[on]
                frac = (us[:, 11] * 7.31 + k * 0.381) % 1.0
                lr[on, k] = ((t.nuc_r_um[0] + (t.nuc_r_um[1] - t.nuc_r_um[0]) * frac)
                             / mpp)[on]
        else:
            lr[:, 0] = r
        cells["nlobes"][sel] = nl
        cells["lx"][sel] = lx + ncx[:, None]
        cells["ly"][sel] = ly + ncy[:, None]
        cells["lr"][sel] = lr.astype(np.float32)
        if code in (NEUT, MEGA):
            cells["lphi"][sel] = (us[:, 26:26 + MAX_LOBES] * np.pi).astype(np.float32)
            cells["la2"][sel] = ((us[:, 34:34 + MAX_LOBES] - 0.5) * 2 * t.harm).astype(
                np.float32)
            cells["lp2"][sel] = (us[:, 38:38 + MAX_LOBES] * 2 * np.pi).astype(np.float32)
        else:
            cells["lasp"][sel, 0] = asp
            cells["lphi"][sel, 0] = phi
            cells["la2"][sel, 0] = (us[:, 14] - 0.5) * 2 * t.harm
            cells["lp2"][sel, 0] = us[:, 15] * 2 * np.pi
            cells["la3"][sel, 0] = (us[:, 16] - 0.5) * 2 * t.harm
            cells["lp3"][sel, 0] = us[:, 17] * 2 * np.pi
        if t.notch[1] > 0:
            cells["notch"][sel] = t.notch[0] + (t.notch[1] - t.notch[0]) * us[:, 18]
            # the indentation faces the cell centre side, like a monocyte's hof
            cells["notch_t"][sel] = (us[:, 19] - 0.5) * 0.6 + (np.pi / 2)
        if t.nucleoli[1] > 0:
            cnt = t.nucleoli[0] + np.floor(us[:, 25] * (t.nucleoli[1] - t.nucleoli[0] + 1))
            for k in range(2):
                on = k < cnt
                a = us[:, 26 + 2 * k] * 2 * np.pi
                rad = 0.45 * r * np.sqrt(us[:, 27 + 2 * k])
                cells["nl_x"][sel, k] = ncx + rad * np.cos(a)
                cells["nl_y"][sel, k] = ncy + rad * np.sin(a)
                cells["nl_r"][sel, k] = np.where(on, (0.7 + 0.5 * us[:, 30 + k]) / mpp, 0)
        cells["ncx"][sel] = ncx
        cells["ncy"][sel] = ncy


def nucleus_extent(cells: dict[str, Any]) -> np.ndarray:
    """Radius around the nucleus centre that holds the whole nucleus (px)."""
    on = np.arange(MAX_LOBES)[None, :] < cells["nlobes"][:, None]
    reach = (np.hypot(cells["lx"] - cells["ncx"][:, None], cells["ly"] - cells["ncy"][:, None])
             + cells["lr"] * np.sqrt(cells["lasp"]) * (1 + np.abs(cells["la2"])
                                                       + np.abs(cells["la3"])))
    return np.where(on, reach, 0).max(1) if len(on) else np.zeros(0)


def _shrink_crowded(spec: SlideSpec, cells: dict[str, Any]) -> None:
    """Scale down nuclei that would overlap a neighbour's (at most to 0.7x).

    Marrow is packed but its nuclei are segmentable: a nucleus shrinks about its centre
    until it clears each neighbour by a small gap; the scale depends only on neighbours'
    nominal sizes, so it is local and deterministic.
    """
    n = len(cells["x"])
    ext = nucleus_extent(cells)
    # lobed nuclei are thin: their room is set by an equal-area disc, not their reach
    lobed = cells["nlobes"] > 1
    eff = np.where(lobed, cells["lr"][:, 0] * np.sqrt(np.maximum(cells["nlobes"], 1)) * 1.1,
                   ext)
    scale = np.ones(n, np.float32)
    nuc = np.flatnonzero((cells["type"] != RBC) & (cells["type"] != MEGA))
    if len(nuc) > 1:
        gap = 0.3 / spec.mpp
        pts = np.column_stack([cells["ncx"][nuc], cells["ncy"][nuc]])
        pairs = cKDTree(pts).query_pairs(2 * float(eff[nuc].max()) + gap,
                                         output_type="ndarray")
        if len(pairs):
            a, b = nuc[pairs[:, 0]], nuc[pairs[:, 1]]
            d = np.hypot(cells["ncx"][a] - cells["ncx"][b], cells["ncy"][a] - cells["ncy"][b])
            f = np.clip((d - gap) / (eff[a] + eff[b]), 0.7, 1.0).astype(np.float32)
            np.minimum.at(scale, a, f)
            np.minimum.at(scale, b, f)
    cells["scale"] = scale
    s = scale[:, None]
    cells["lx"] = cells["ncx"][:, None] + (cells["lx"] - cells["ncx"][:, None]) * s
    cells["ly"] = cells["ncy"][:, None] + (cells["ly"] - cells["ncy"][:, None]) * s
    cells["lr"] = cells["lr"] * s
    cells["nl_x"] = cells["ncx"][:, None] + (cells["nl_x"] - cells["ncx"][:, None]) * s
    cells["nl_y"] = cells["ncy"][:, None] + (cells["nl_y"] - cells["ncy"][:, None]) * s
    cells["next"] = (ext * scale).astype(np.float32)


def nucleus_area_centroid(cells: dict[str, Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Area (px^2) and centroid (x, y) of each nucleus as drawn (before occlusion).

    Single lobes and neutrophil chains are integrated exactly from their polar curves
    (neutrophil lobes minus the lens where neighbours overlap); megakaryocytes, whose lobes
    overlap at random, are rasterised.
    """
    n = len(cells["x"])
    area = np.zeros(n)
    cx = cells["ncx"].copy()
    cy = cells["ncy"].copy()
    t = cells["type"]
    single = np.flatnonzero((t != RBC) & (t != MEGA) & (t != NEUT))
    if len(single):
        a, mx, my = _lobe_area_centroid(cells, 0, single)
        area[single] = a
        cx[single] = cells["lx"][single, 0] + mx
        cy[single] = cells["ly"][single, 0] + my
    neut = np.flatnonzero(t == NEUT)
    for k in range(MAX_LOBES):
        sel = neut[cells["nlobes"][neut] > k]
        if len(sel) == 0:
            break
        a, _, _ = _lobe_area_centroid(cells, k, sel)
        area[sel] += a
        if k > 0:  # lens shared with the previous lobe
            r1 = cells["lr"][sel, k - 1].astype(float)
            r2 = cells["lr"][sel, k].astype(float)
            d = np.hypot(cells["lx"][sel, k] - cells["lx"][sel, k - 1],
                         cells["ly"][sel, k] - cells["ly"][sel, k - 1])
            area[sel] -= _lens_area(r1, r2, d)
    mega = np.flatnonzero(t == MEGA)
    for m in mega:
        ext = float(nucleus_extent({k: v[m:m + 1] for k, v in cells.items()
                                    if isinstance(v, np.ndarray) and len(v) == n})[0]) + 2
        p = int(math.ceil(ext))
        ox, oy = round(cells["ncx"][m]), round(cells["ncy"][m])
        gx = np.arange(ox - p, ox + p + 1, dtype=np.float32)[None, None, :]
        gy = np.arange(oy - p, oy + p + 1, dtype=np.float32)[None, :, None]
        depth = nucleus_depth(cells, np.array([m]), gx, gy)[0]
        inside = depth > 0
        area[m] = inside.sum()
        yy, xx = np.nonzero(inside)
        if len(xx):
            cx[m] = ox - p + xx.mean()
            cy[m] = oy - p + yy.mean()
    return area, cx, cy


def _lens_area(r1: np.ndarray, r2: np.ndarray, d: np.ndarray) -> np.ndarray:
    """Area of the intersection of two circles (vectorised)."""
    d = np.maximum(d, 1e-9)
    out = np.zeros_like(d)
    full = d <= np.abs(r1 - r2)
    out[full] = np.pi * np.minimum(r1, r2)[full] ** 2
    part = (d < r1 + r2) & ~full
    a, b, c = r1[part], r2[part], d[part]
    out[part] = (a * a * np.arccos(np.clip((c * c + a * a - b * b) / (2 * c * a), -1, 1))
                 + b * b * np.arccos(np.clip((c * c + b * b - a * a) / (2 * c * b), -1, 1))
                 - 0.5 * np.sqrt(np.maximum((-c + a + b) * (c + a - b) * (c - a + b)
                                            * (c + a + b), 0)))
    return out


def nucleus_depth(cells: dict[str, Any], sel: np.ndarray, gx: np.ndarray, gy: np.ndarray
                  ) -> np.ndarray:
    """Depth of the nuclei of cells ``sel`` (union of lobes) on absolute pixel grids.

    ``gx`` has shape (n, 1, P) and ``gy`` (n, P, 1) (or broadcastable); returns (n, P, P).
    """
    depth = None
    nl = cells["nlobes"][sel]
    for k in range(int(nl.max()) if len(nl) else 0):
        on = np.flatnonzero(nl > k)
        sub = sel[on]
        dx = (gx[on] if gx.shape[0] > 1 else gx) - cells["lx"][sub, k][:, None, None].astype(
            np.float32)
        dy = (gy[on] if gy.shape[0] > 1 else gy) - cells["ly"][sub, k][:, None, None].astype(
            np.float32)
        d = lobe_depth(cells, k, sub, dx, dy)
        if depth is None:
            depth = d
        elif len(on) == len(sel):
            np.maximum(depth, d, out=depth)
        else:
            depth[on] = np.maximum(depth[on], d)
    return depth


def body_depth(cells: dict[str, Any], sel: np.ndarray, gx: np.ndarray, gy: np.ndarray
               ) -> np.ndarray:
    """Depth of the cell bodies of cells ``sel`` on absolute pixel grids (n, P, P).

    A body is a disc stretched by ``body_asp`` along ``body_phi`` (to first order, a
    second harmonic) and perturbed by a second harmonic of its own.
    """
    dx = gx - cells["x"][sel][:, None, None].astype(np.float32)
    dy = gy - cells["y"][sel][:, None, None].astype(np.float32)
    rho2 = dx * dx + dy * dy + np.float32(1e-8)
    rho = np.sqrt(rho2)
    cos2 = (dx * dx - dy * dy) / rho2
    sin2 = 2 * dx * dy / rho2
    phi = cells["body_phi"][sel].astype(np.float64)
    p2 = cells["body_p2"][sel].astype(np.float64)
    e = (cells["body_asp"][sel] - 1) / 2
    a2 = cells["body_a2"][sel]
    # e*cos(2(theta - phi)) + a2*cos(2 theta + p2) = A cos 2theta + B sin 2theta
    ca = (e * np.cos(2 * phi) + a2 * np.cos(p2)).astype(np.float32)[:, None, None]
    cb = (e * np.sin(2 * phi) - a2 * np.sin(p2)).astype(np.float32)[:, None, None]
    r = cells["body_r"][sel][:, None, None] * (1 + ca * cos2 + cb * sin2)
    return r - rho
