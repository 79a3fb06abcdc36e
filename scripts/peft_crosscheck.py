#!/usr/bin/env python3
"""Cross-checks ta-merge's LoRA expansion against PEFT's merge_and_unload().

Not part of CI (it needs torch, transformers and peft):

    python3 -m venv /tmp/venv-peft
    /tmp/venv-peft/bin/pip install torch transformers peft safetensors
    cargo build --release --bins
    /tmp/venv-peft/bin/python scripts/peft_crosscheck.py [WORKDIR]

Builds a tiny Llama model (float32), a LoRA adapter on every attention and
MLP matrix and on the embedding (rsLoRA, a rank pattern, an alpha pattern,
lm_head in modules_to_save, random B so the update is not zero), saves it as
PEFT does (safetensors and .bin), and compares PEFT's merged weights with
`ta-merge --lambdas 1` on the adapter folder: in float64 (PEFT merging a
float64 copy of the model) and in float32 (the stored type).
"""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.numpy import load_file
from transformers import LlamaConfig, LlamaForCausalLM

work = Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/peft-crosscheck")
work.mkdir(parents=True, exist_ok=True)
root = Path(__file__).resolve().parent.parent
ta_merge = root / "target" / "release" / "ta-merge"

torch.manual_seed(0)
config = LlamaConfig(
    vocab_size=1000,
    hidden_size=64,
    intermediate_size=172,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
    tie_word_embeddings=False,
)
base = LlamaForCausalLM(config).float()
base.save_pretrained(work / "base", safe_serialization=True)

lora = LoraConfig(
    r=8,
    lora_alpha=16,
    use_rslora=True,
    target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "embed_tokens"],
    rank_pattern={"layers.1.mlp.up_proj": 4},
    alpha_pattern={"down_proj": 3},
    modules_to_save=["lm_head"],
    init_lora_weights=False,  # random B: a non-zero update
)
peft_model = get_peft_model(LlamaForCausalLM.from_pretrained(work / "base"), lora)
with torch.no_grad():
    for name, p in peft_model.named_parameters():
        if "modules_to_save" in name:
            p.add_(0.01 * torch.randn_like(p))
peft_model.save_pretrained(work / "adapter", safe_serialization=True)
peft_model.save_pretrained(work / "adapter-bin", safe_serialization=False)
keys = sorted(load_file(str(work / "adapter" / "adapter_model.safetensors")))
print(f"adapter tensors: {len(keys)}, e.g. {keys[:2]} ... {keys[-2:]}")

def peft_merged(dtype):
    model = LlamaForCausalLM.from_pretrained(work / "base", torch_dtype=dtype)
    model = PeftModel.from_pretrained(model, work / "adapter", torch_dtype=dtype)
    model = model.to(dtype)
    merged = model.merge_and_unload()
    return {k: v.detach().numpy() for k, v in merged.state_dict().items()}

def ta_merged(adapter, dtype_flag):
    out = work / f"ta-{adapter}-{dtype_flag}"
    subprocess.run(
        [str(ta_merge), "--quiet", "--force", "--base-model-path", str(work / "base"),
         "--other-model-paths", str(work / adapter), "--lambdas", "1",
         "--dtype", dtype_flag, "--output-path", str(out)],
        check=True,
    )
    record = json.loads((out / "merge_record.json").read_text())
    return load_file(str(out / "model.safetensors")), record["models"][0]["adapter"]

ref64 = peft_merged(torch.float64)
ref32 = peft_merged(torch.float32)
base_sd = load_file(str(work / "base" / "model.safetensors"))
for adapter in ["adapter", "adapter-bin"]:
    got64, summary = ta_merged(adapter, "f64")
    got32, _ = ta_merged(adapter, "f32")
    print(f"{adapter}: record {summary}")
    worst64, changed, total, ta_exact, peft_exact, peft_far = 0.0, 0, 0, 0, 0, 0
    for name, want in ref64.items():
        if name not in got64:
            continue
        g = got64[name]
        d = np.abs(g - want) / np.maximum(np.abs(want), 1e-30)
        worst64 = max(worst64, float(d.max()))
        changed += int((want != base_sd[name].astype(np.float64)).any())
        # float32: both against PEFT's float64 merge rounded once to float32.
        truth = want.astype(np.float32)
        total += truth.size
        ta_exact += int((got32[name] == truth).sum())
        peft_exact += int((ref32[name] == truth).sum())
        ulps = np.abs(ref32[name].view(np.int32).astype(np.int64) - truth.view(np.int32).astype(np.int64))
        peft_far += int((ulps > 1).sum())
    print(f"  float64: {len(ref64)} tensors ({changed} changed by the adapter), "
          f"largest relative difference from PEFT {worst64:.3g}")
    print(f"  float32: of {total} elements, equal to PEFT's float64 merge rounded once to float32: "
          f"ta-merge {100 * ta_exact / total:.4f}%, PEFT's own float32 merge {100 * peft_exact / total:.4f}% "
          f"({peft_far} elements more than 1 ulp away)")
