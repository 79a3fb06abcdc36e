"""Checks that a `ta-merge --vocab union` output loads in transformers.

Outside CI (needs torch, transformers and tokenizers): builds a tiny Llama
base with a WordLevel tokenizer and two fine-tunes that add tokens with
transformers' own `add_tokens` + `resize_token_embeddings`, merges them with
`--vocab union`, then loads the output with AutoModelForCausalLM and
AutoTokenizer and checks that the added tokens encode to the ids whose rows
hold their merged embeddings, and that a forward pass runs.

    python scripts/check_vocab_union.py TA_MERGE_BINARY WORK_DIR
"""

import subprocess
import sys
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (AutoModelForCausalLM, AutoTokenizer, LlamaConfig,
                          LlamaForCausalLM, PreTrainedTokenizerFast)

binary, work = sys.argv[1], Path(sys.argv[2])
torch.manual_seed(0)

words = {f"t{i}": i for i in range(34)}
words["<s>"], words["</s>"], words["[UNK]"] = 34, 35, 36
raw = Tokenizer(models.WordLevel(vocab=words, unk_token="[UNK]"))
raw.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
base_tok = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>",
                                   eos_token="</s>", unk_token="[UNK]")
config = LlamaConfig(vocab_size=37, hidden_size=16, intermediate_size=24,
                     num_hidden_layers=2, num_attention_heads=2,
                     num_key_value_heads=2, tie_word_embeddings=False)
base = LlamaForCausalLM(config)
base.save_pretrained(work / "base")
base_tok.save_pretrained(work / "base")

finetunes = {"chat": ["<|im_start|>", "<|im_end|>"], "lang": ["<lang>", "<|im_end|>"]}
tuned = {}
for name, added in finetunes.items():
    tok = AutoTokenizer.from_pretrained(work / "base")
    tok.add_tokens(added, special_tokens=True)
    model = LlamaForCausalLM.from_pretrained(work / "base")
    model.resize_token_embeddings(len(tok))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    model.save_pretrained(work / name)
    tok.save_pretrained(work / name)
    tuned[name] = (tok, model)

out = work / "merged"
subprocess.run([binary, "--base_model_path", str(work / "base"), "--other_model_paths",
                str(work / "chat"), str(work / "lang"), "--lambdas", "1", "1",
                "--vocab", "union", "--dtype", "f32", "--output_path", str(out),
                "--force"], check=True)

tok = AutoTokenizer.from_pretrained(out)
model = AutoModelForCausalLM.from_pretrained(out)
rows = model.get_input_embeddings().weight.shape[0]
assert rows == len(tok) == model.config.vocab_size == 40, (rows, len(tok))
assert model.get_output_embeddings().weight.shape[0] == 40
ids = tok("<|im_start|> t3 <lang> <|im_end|> t5", add_special_tokens=False)["input_ids"]
assert ids == [37, 3, 39, 38, 5], ids
# Union rows: <|im_start|> only in chat, <lang> only in lang, <|im_end|> in
# both (weights renormalised: the average of the two rows).
emb = model.get_input_embeddings().weight
def row(name, token):
    t, m = tuned[name]
    return m.get_input_embeddings().weight[t.convert_tokens_to_ids(token)]
with torch.no_grad():
    assert torch.allclose(emb[37], row("chat", "<|im_start|>"), atol=1e-6)
    assert torch.allclose(emb[39], row("lang", "<lang>"), atol=1e-6)
    avg = (row("chat", "<|im_end|>") + row("lang", "<|im_end|>")) / 2
    assert torch.allclose(emb[38], avg, atol=1e-6)
    logits = model(torch.tensor([ids])).logits
assert logits.shape == (1, 5, 40), logits.shape
print("ok: union output loads; added tokens encode to", ids[0], ids[2], ids[3],
      "with their merged rows; forward pass logits", tuple(logits.shape))
