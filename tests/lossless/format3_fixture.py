"""tests/lossless/data/format3.czip: a real file written by :func:`write` with the format-3
writer (commit a990bda), kept to prove later readers decode it byte-identically. Running this
module with a later writer would write that writer's format: the test only uses
:func:`arrays`, the tensors the file must decode to."""

from __future__ import annotations

import numpy as np

from compress.lossless.container import ContainerWriter


def arrays() -> dict[str, np.ndarray]:
    """The tensors stored in format3.czip (deterministic)."""
    rng = np.random.default_rng(3)
    w = (rng.standard_normal(3000) * 0.05).astype(np.float32)
    keep = rng.random(3000) < 0.45
    codes = np.clip(np.round(rng.laplace(0, 1.6, 3000)), -8, 7).astype(np.int8)
    codes[~keep] = 0
    small = np.clip(np.round(rng.laplace(0, 1.6, 160)), -8, 7).astype(np.int8)
    i8 = np.clip(np.round(rng.standard_normal(20000) * 2.5), -128, 127).astype(np.int8)
    i8[::997] = 100
    pruned = w.copy()
    pruned[np.abs(pruned) < 0.04] = 0
    return {"w": w, "pruned": pruned, "h": w.astype(np.float16), "keep": keep, "codes": codes, "small": small, "i8": i8}


BLOB = b"graph bytes " * 50


def write(path: str) -> None:
    a = arrays()
    with ContainerWriter(path, meta={"note": "format 3"}, chunk_size=8192, threads=1) as wr:
        for name in ("w", "pruned", "h", "keep"):
            wr.add_tensor(name, a[name])
        wr.add_tensor("codes", a["codes"], layout="i4", mask="keep")
        wr.add_tensor("small", a["small"], layout="i4")
        wr.add_tensor("i8", a["i8"])
        wr.add_blob("blob", BLOB)


if __name__ == "__main__":
    write("tests/lossless/data/format3.czip")
