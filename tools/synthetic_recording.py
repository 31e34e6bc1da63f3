"""Write a synthetic recording of LAYERS x STEPS (log-normal norms, a few spikes), to time
`gradclip report` on a recording of a long run without training one.

    python tools/synthetic_recording.py OUT.gcrec --layers 1000 --steps 100000
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from gradclip.core.layers import Layer
from gradclip.core.record import Recorder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out")
    parser.add_argument("--layers", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=100_000)
    args = parser.parse_args()
    w = torch.zeros(1)
    layers = [Layer(f"layers.{i}", ("weight",), (w,)) for i in range(args.layers)]
    recorder = Recorder(args.out, layers, ["ClipL2PerLayer(threshold=1.0)"] * args.layers)
    dtype = np.dtype([tuple(field) for field in recorder.record_dtype()])
    rng = np.random.default_rng(0)
    scale = np.exp(rng.normal(0, 2, args.layers)).astype(np.float32)
    with open(args.out, "wb") as f:
        header = recorder._open()  # the header exactly as a recording writes it
        header.close()
    with open(args.out, "ab") as f:
        for start in range(0, args.steps, 10_000):
            n = min(10_000, args.steps - start)
            rows = np.zeros(n, dtype)
            rows["step"] = np.arange(start, start + n)
            rows["norm"] = scale * np.exp(rng.normal(0, 0.3, (n, args.layers)))
            rows["flags"] = 1
            spikes = rng.integers(0, n, 3)
            rows["norm"][spikes, rng.integers(0, args.layers, 3)] *= 1e4
            f.write(rows.tobytes())
    recorder.closed = True


if __name__ == "__main__":
    main()
