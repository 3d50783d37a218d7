"""Paired bootstrap of two enhancers measured by ``scripts/choose_correction_sigma.py`` on the same validation
photographs: the difference B - A of the mean PSNR, SSIM and vessel F1 over every (photograph, degradation) row,
with a 95% interval from resampling the photographs (each keeps its rows of both degradations).

    python scripts/compare_choices.py docs/correction_cofe.json:0 docs/correction_cofe_add_seg.json:32 [--resamples 10000] [--seed 0]

Each argument is a record written with ``--record`` and the sigma whose rows to take (the record's own choice when
omitted). Prints one JSON object. Both records must hold the same photographs and degradations (the validation
photographs DRIVE 37-40 and HRF 05_h/g/dr, released 111 and ``moderate``, seed 0): a pair that does not is refused.
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np

METRICS = ("psnr", "ssim", "f1")


def fail(message: str) -> None:
    print(f"Error: {message}", file=sys.stderr)
    raise SystemExit(2)


def rows_of(spec: str) -> tuple[str, dict]:
    path, sep, sigma = spec.rpartition(":")
    try:
        float(sigma)
    except ValueError:  # no ":SIGMA" (a path may hold a ':' of its own)
        path, sigma = spec, ""
    if not sep:
        path, sigma = spec, ""
    try:
        record = json.loads(open(path, encoding="utf-8").read())
        want = float(sigma) if sigma else float(record["choice"])
        rows = {(r["image"], r["degradation"]): r for r in record["rows"] if r.get("sigma") is not None and float(r["sigma"]) == want}
        name = f"{record['weights']} (sigma {want:g})"
        if rows and any(m not in r for r in rows.values() for m in METRICS):
            raise KeyError("a row without " + "/".join(METRICS))
    except OSError as e:
        fail(f"cannot read {path}: {e.strerror or e}")
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        fail(f"{path} is not a record of scripts/choose_correction_sigma.py --record ({type(e).__name__}: {e})")
    if not rows:
        fail(f"{path} has no rows of sigma {want:g}")
    return name, rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("a")
    ap.add_argument("b")
    ap.add_argument("--resamples", type=int, default=10000, help="at least 1")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.resamples < 1:
        fail(f"--resamples must be at least 1, not {args.resamples}")
    name_a, a = rows_of(args.a)
    name_b, b = rows_of(args.b)
    if set(a) != set(b):
        fail("the two records do not hold the same photographs and degradations")
    keys = sorted(a)
    images = sorted({k[0] for k in keys})
    diff = {m: np.array([[b[k][m] - a[k][m] for k in keys if k[0] == im] for im in images]) for m in METRICS}  # images x degradations
    rng = np.random.default_rng(args.seed)
    draws = rng.integers(0, len(images), size=(args.resamples, len(images)))
    out: dict = {"a": name_a, "b": name_b, "photographs": len(images), "rows": len(keys), "resamples": args.resamples, "seed": args.seed,
                 "interval": "95% percentile, resampling photographs"}
    for m in METRICS:
        d = diff[m]
        boot = d[draws].mean(axis=(1, 2))
        lo, hi = np.percentile(boot, [2.5, 97.5])
        out[m] = {"a": round(float(np.mean([a[k][m] for k in keys])), 4), "b": round(float(np.mean([b[k][m] for k in keys])), 4),
                  "b_minus_a": round(float(d.mean()), 4), "ci": [round(float(lo), 4), round(float(hi), 4)]}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
