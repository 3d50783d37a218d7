"""Field-of-view (FOV) geometry and estimation for fundus photographs (torch-free)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class FovGeometry:
    """The FOV circle in native pixel coordinates.

    ``cx``/``cy`` are the circle centre (column, row), ``radius`` its radius. The circle may extend past
    the image border (HRF and EyePACS photographs cut the FOV at the top and bottom).
    """

    cx: float
    cy: float
    radius: float
    height: int
    width: int

    @property
    def diameter(self) -> float:
        return 2.0 * self.radius

    def to_dict(self) -> dict:
        return {"cx": self.cx, "cy": self.cy, "radius": self.radius, "height": self.height, "width": self.width}

    @classmethod
    def from_dict(cls, d: dict) -> "FovGeometry":
        return cls(float(d["cx"]), float(d["cy"]), float(d["radius"]), int(d["height"]), int(d["width"]))

    def circle_mask(self) -> np.ndarray:
        yy, xx = np.ogrid[: self.height, : self.width]
        return (xx - self.cx) ** 2 + (yy - self.cy) ** 2 <= self.radius**2
