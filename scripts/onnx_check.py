#!/usr/bin/env python3
"""Check an ONNX model exported by bnlab against bnlab's own predictions.

Usage: onnx_check.py MODEL.onnx DATA_DIR PREDICTIONS.txt [--limit N]

Runs the whole test set of DATA_DIR (MNIST or Fashion-MNIST: t10k-images-idx3-ubyte[.gz];
pixels / 255 as float32) through the model with onnxruntime, shaped [N, 784] or, for a model
whose input has rank 4 (the convolutional presets), [N, 1, 28, 28] and compares the argmax of each image's logits with the class bnlab
predicted (PREDICTIONS.txt: one integer per line, in test-set order). The batches are 1000
images and then the remainder in batches of 7, so the symbolic batch dimension is exercised
with several sizes. With --limit N only the first N images are checked (PREDICTIONS.txt may
hold N or all lines). Prints one summary line; exit status 0 only if every image matches.
"""

import gzip
import os
import sys

import numpy as np
import onnxruntime as ort


def read_idx(mnist_dir, name):
    """An IDX file (raw or gzip, detected by content) as a numpy array."""
    for candidate in (name, name + ".gz"):
        path = os.path.join(mnist_dir, candidate)
        if os.path.exists(path):
            break
    else:
        sys.exit(f"onnx_check: {name}(.gz) not found in {mnist_dir}")
    with open(path, "rb") as f:
        data = f.read()
    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    if data[0:2] != b"\x00\x00" or data[2] != 0x08:
        sys.exit(f"onnx_check: {path}: not an unsigned-byte IDX file")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        sys.exit(f"onnx_check: {path}: {body.size} bytes for dimensions {dims}")
    return body.reshape(dims)


def main():
    args = sys.argv[1:]
    limit = None
    if len(args) == 5 and args[3] == "--limit":
        limit = int(args[4])
        args = args[:3]
    if len(args) != 3:
        sys.exit(__doc__.strip().splitlines()[2])
    model, mnist_dir, preds_path = args
    images = read_idx(mnist_dir, "t10k-images-idx3-ubyte")
    x = (images.reshape(images.shape[0], -1).astype(np.float32) / np.float32(255.0))
    with open(preds_path) as f:
        want = np.array([int(line) for line in f if line.strip()], dtype=np.int64)
    if limit is not None:
        x = x[:limit]
        want = want[:limit]
    if want.size != x.shape[0]:
        sys.exit(f"onnx_check: {want.size} predictions for {x.shape[0]} test images")

    sess = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    (inp,) = sess.get_inputs()
    (out,) = sess.get_outputs()
    if inp.name != "input" or out.name != "logits":
        sys.exit(f"onnx_check: model has input {inp.name!r}, output {out.name!r}")
    if len(inp.shape) == 4:
        x = x.reshape(x.shape[0], 1, 28, 28)

    # 1000 per batch, then the last 1000 in batches of 7 (and a shorter tail).
    starts, pos = [], 0
    while pos < x.shape[0]:
        size = 1000 if pos < x.shape[0] - 1000 else 7
        starts.append((pos, min(pos + size, x.shape[0])))
        pos += size
    got = np.empty(x.shape[0], dtype=np.int64)
    sizes = set()
    for a, b in starts:
        (logits,) = sess.run(["logits"], {"input": x[a:b]})
        if logits.shape != (b - a, 10):
            sys.exit(f"onnx_check: logits of shape {logits.shape} for a batch of {b - a}")
        got[a:b] = np.argmax(logits, axis=1)
        sizes.add(b - a)

    mismatches = np.flatnonzero(got != want)
    print(
        f"onnx_check: {x.shape[0] - mismatches.size} / {x.shape[0]} predictions match, "
        f"{mismatches.size} mismatches (batch sizes {sorted(sizes)}, onnxruntime {ort.__version__})"
    )
    for i in mismatches[:10]:
        print(f"  image {i}: onnxruntime {got[i]}, bnlab {want[i]}")
    sys.exit(0 if mismatches.size == 0 else 1)


if __name__ == "__main__":
    main()
