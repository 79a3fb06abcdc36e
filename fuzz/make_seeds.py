"""Writes the seed inputs of both fuzz targets into fuzz/corpus/<target>/.

    python fuzz/make_seeds.py

The fuzzers grow the corpus from these; the committed corpus is the merged
(-merge=1) result of a run, so this is only needed to start afresh.
"""

import collections
import json
import os
import pickle
import zipfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
FIXTURES = os.path.join(ROOT, "tests", "pickle-fixtures")
SAFETENSORS = os.path.join(ROOT, "tests", "fuzz-corpus")


def out(target, name, data):
    d = os.path.join(HERE, "corpus", target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


# The pickle target: torch.save archives, their bare data.pkl, and plain
# pickles of every protocol (opcode coverage; they hold no tensors).
for name in sorted(os.listdir(FIXTURES)):
    data = open(os.path.join(FIXTURES, name), "rb").read()
    out("pickle", "zip-" + name, data)
    with zipfile.ZipFile(os.path.join(FIXTURES, name)) as z:
        pkl = [n for n in z.namelist() if n.endswith("/data.pkl")][0]
        out("pickle", "pkl-" + name, z.read(pkl))
value = {
    "a": [1, -2, 2**70, 1.5, None, True, False],
    "b": ("x", b"y", bytearray(b"z")),
    "c": {frozenset([1]), 2},
    "d": collections.OrderedDict(k=1),
    "e": "\u00e9\u4e2d" * 3,
}
value["f"] = [value["a"], value["a"]]
for proto in range(6):
    out("pickle", f"plain-{proto}", pickle.dumps(value, protocol=proto))

# The checkpoint target: mode byte, then a file or an index, NUL, a shard.
for name in sorted(os.listdir(SAFETENSORS)):
    data = open(os.path.join(SAFETENSORS, name), "rb").read()
    out("checkpoint", "single-" + name, b"\x00" + data)
valid = open(os.path.join(SAFETENSORS, "valid.safetensors"), "rb").read()
shard = "model-00001-of-00001.safetensors"
index = {"metadata": {"total_size": 20}, "weight_map": {"a": shard, "b": shard}}
out("checkpoint", "index-valid", b"\x01" + json.dumps(index).encode() + b"\x00" + valid)
module = open(os.path.join(FIXTURES, "module.pt"), "rb").read()
shard = "pytorch_model-00001-of-00001.bin"
index = {"weight_map": {"weight": shard, "bias": shard}}
out("checkpoint", "pickle-index", b"\x02" + json.dumps(index).encode() + b"\x00" + module)
