"""Campaign 27a F7: a circle fitted with its centre outside the picture is no field of view."""

import numpy as np

from degradation.fov import estimate_fov_geometry


def test_a_squashed_strip_has_no_field_of_view_centred_outside_it():
    h, w = 400, 400
    yy, xx = np.mgrid[:h, :w]
    disc = ((xx - 200) ** 2 + (yy - 200) ** 2 <= 180**2).astype(np.float32)
    rgb = np.stack([disc * 0.8, disc * 0.4, disc * 0.2], axis=2)
    mask, geom = estimate_fov_geometry(rgb)
    assert not mask.all() and abs(geom.cx - 199.5) < 3 and abs(geom.radius - 180) < 4  # the disc itself: found
    import cv2

    strip = cv2.resize(rgb, (1024, 32), interpolation=cv2.INTER_AREA)  # the same photograph squashed to a strip
    mask, geom = estimate_fov_geometry(strip)
    assert mask.all(), geom  # was: a circle centred 91 px above the strip, 93% of it "inside"
