"""The canonical frame of the enhancement network: the FOV's bounding square, padded with black where it
leaves the photograph, resized to ``size x size`` (Cofe-Net's pre-processing: crop the FOV circle's
bounding box, pad to a square, resize to 512). Pure numpy/OpenCV; no torch.

``CanonicalFrame.from_fov(geometry, size)`` fixes the integer square in native pixels (side
``round(2 r)``, top-left ``round(c - r)``); ``to_canonical`` maps a native array into the frame (area
averaging when shrinking, bilinear when enlarging) and ``to_native`` maps a canonical array back
(bilinear), filling the native pixels outside the square with ``fill``.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np


@dataclass(frozen=True)
class CanonicalFrame:
    x0: int  # native column of the square's left edge (may be < 0)
    y0: int  # native row of the square's top edge (may be < 0)
    side: int  # native pixels per square side
    height: int  # native image height
    width: int  # native image width
    size: int  # canonical side

    @classmethod
    def from_fov(cls, geometry, size: int) -> "CanonicalFrame":
        side = max(2, int(round(2.0 * geometry.radius)))
        x0 = int(round(geometry.cx - side / 2.0))
        y0 = int(round(geometry.cy - side / 2.0))
        return cls(x0, y0, side, int(geometry.height), int(geometry.width), int(size))

    @property
    def scale(self) -> float:
        """Canonical pixels per native pixel."""
        return self.size / self.side

    def _overlap(self) -> tuple[int, int, int, int]:
        """Native box (x0, x1, y0, y1) of the square clipped to the image."""
        return max(self.x0, 0), min(self.x0 + self.side, self.width), max(self.y0, 0), min(self.y0 + self.side, self.height)

    def square(self, arr: np.ndarray, fill: float = 0.0) -> np.ndarray:
        """The native square (side x side), padded with ``fill`` where it leaves the image."""
        ax0, ax1, ay0, ay1 = self._overlap()
        out = np.full((self.side, self.side) + arr.shape[2:], fill, dtype=arr.dtype)
        if ax1 > ax0 and ay1 > ay0:
            out[ay0 - self.y0 : ay1 - self.y0, ax0 - self.x0 : ax1 - self.x0] = arr[ay0:ay1, ax0:ax1]
        return out

    def to_canonical(self, arr: np.ndarray, interpolation: int | None = None) -> np.ndarray:
        sq = self.square(arr)
        if self.side == self.size:
            return sq
        if interpolation is None:
            interpolation = cv2.INTER_AREA if self.side > self.size else cv2.INTER_LINEAR
        return cv2.resize(sq, (self.size, self.size), interpolation=interpolation)

    def to_native(self, arr: np.ndarray, fill: float = 0.0, interpolation: int = cv2.INTER_LINEAR) -> np.ndarray:
        """A canonical array resampled to the native square and placed into a native-size array."""
        sq = arr if self.side == self.size else cv2.resize(arr, (self.side, self.side), interpolation=interpolation)
        out = np.full((self.height, self.width) + arr.shape[2:], fill, dtype=sq.dtype)
        ax0, ax1, ay0, ay1 = self._overlap()
        if ax1 > ax0 and ay1 > ay0:
            out[ay0:ay1, ax0:ax1] = sq[ay0 - self.y0 : ay1 - self.y0, ax0 - self.x0 : ax1 - self.x0]
        return out

    def point_to_canonical(self, x: float, y: float) -> tuple[float, float]:
        return (x - self.x0 + 0.5) * self.scale - 0.5, (y - self.y0 + 0.5) * self.scale - 0.5


def canonical_fov_geometry(size: int):
    """The FOV circle inscribed in the canonical frame (what the degradation simulator is given there)."""
    from degradation.fov import FovGeometry

    return FovGeometry(cx=(size - 1) / 2.0, cy=(size - 1) / 2.0, radius=size / 2.0, height=size, width=size)
