"""Writes the small torch.save fixtures under tests/pickle-fixtures/.

Run once with any recent torch (not needed by the tests themselves):

    python fuzz/make_pickle_fixtures.py

Values are small integers so the tests can state them independently.
"""

import collections
import os

import torch

OUT = os.path.join(os.path.dirname(__file__), "..", "tests", "pickle-fixtures")
os.makedirs(OUT, exist_ok=True)


def save(obj, name):
    path = os.path.join(OUT, name)
    torch.save(obj, path)
    print(name, os.path.getsize(path))


# Views of one storage, every element type, and a tied pair.
w = torch.arange(12, dtype=torch.float32).reshape(3, 4)
emb = torch.arange(6, dtype=torch.bfloat16).reshape(2, 3)
views = collections.OrderedDict()
views["w"] = w
views["w_t"] = w.t()  # transposed: stride (1, 4)
views["w_slice"] = w[1:, 1:3]  # offset 5, stride (4, 1)
views["w_col"] = w[:, 2]  # offset 2, stride (4,)
views["model.embed_tokens.weight"] = emb
views["lm_head.weight"] = emb  # tied: same storage, same view
views["f16"] = torch.tensor([0.5, -2.0, 65504.0], dtype=torch.float16)
views["f64"] = torch.tensor([1.0 / 3.0, -1e300], dtype=torch.float64)
views["i64"] = torch.tensor([-3, 2**40, 7], dtype=torch.int64)
views["i32"] = torch.tensor([[-1, 2], [3, -4]], dtype=torch.int32)
views["i16"] = torch.tensor([-300, 300], dtype=torch.int16)
views["i8"] = torch.tensor([-128, 127], dtype=torch.int8)
views["u8"] = torch.tensor([0, 255, 9], dtype=torch.uint8)
views["mask"] = torch.tensor([True, False, True, True])
views["u16"] = torch.tensor([1, 65535], dtype=torch.uint16)  # _rebuild_tensor_v3
views["scalar"] = torch.tensor(2.5)
views["empty"] = torch.zeros(0, 3)
save(views, "views.pt")

# A module's state dict: an OrderedDict with _metadata (BUILD), and
# parameters saved as such (_rebuild_parameter).
torch.manual_seed(0)
lin = torch.nn.Linear(3, 2)
with torch.no_grad():
    lin.weight.copy_(torch.arange(6, dtype=torch.float32).reshape(2, 3))
    lin.bias.copy_(torch.tensor([-1.0, 1.0]))
save(lin.state_dict(), "module.pt")
save({"weight": lin.weight, "bias": lin.bias}, "parameters.pt")

# A training checkpoint: the weights under "state_dict", beside other data.
save(
    {
        "epoch": 3,
        "state_dict": lin.state_dict(),
        "optimizer": {"state": {0: {"step": torch.tensor(5.0)}}, "lr": 0.1},
    },
    "training.pt",
)

# Types that cannot be converted: refused by name.
save({"ok": torch.ones(2), "c": torch.tensor([1 + 2j], dtype=torch.complex64)}, "complex.pt")
