"""Relevance of LXT 2.1's efficient AttnLRP / CP-LRP on the tiny test Llama, as JSON on stdout.

Run in its own process: LXT patches `transformers` module globals. Usage:
    python tests/lrp/lxt_relevance.py RULE SEED TEXT [TEXT ...]

Two workarounds for LXT 2.1 on transformers 5.x, both outside the rules being compared:
- `import lxt.efficient` imports every model file LXT ships; its BERT file imports
  `find_pruneable_heads_and_indices` (removed from transformers) and its ViT file needs torchvision.
  Those two submodules are replaced by empty stand-ins (neither is used for Llama).
- LXT's AttnLRP `patch_attention` replaces `modeling_llama.ALL_ATTENTION_FUNCTIONS` with a plain dict,
  which has no `get_interface` (transformers 5 calls it). The registry is put back afterwards; with
  eager attention the model then calls LXT's patched `eager_attention_forward`, i.e. LXT's rule.
"""

import json
import sys
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

for name in ("bert", "vit_torch"):
    stand_in = types.ModuleType(f"lxt.efficient.models.{name}")
    stand_in.modeling_bert = types.ModuleType("unused_bert")
    stand_in.vision_transformer = types.ModuleType("unused_vit")
    stand_in.attnLRP = stand_in.cp_LRP = {}
    sys.modules[f"lxt.efficient.models.{name}"] = stand_in

import lxt.efficient.models.llama as lxt_llama  # noqa: E402
from lxt.efficient import monkey_patch  # noqa: E402
from transformers.models.llama import modeling_llama  # noqa: E402

from conftest import make_tokenizer, tiny_llama  # noqa: E402


def main(rule: str, seed: int, texts: list[str]) -> None:
    registry = modeling_llama.ALL_ATTENTION_FUNCTIONS
    monkey_patch(modeling_llama, lxt_llama.attnLRP if rule == "attnlrp" else lxt_llama.cp_LRP)
    modeling_llama.ALL_ATTENTION_FUNCTIONS = registry
    model, tokenizer = tiny_llama(seed), make_tokenizer()
    for p in model.parameters():
        p.requires_grad_(False)
    out = []
    for text in texts:  # LXT's usage: one text at a time
        ids = tokenizer(text, return_tensors="pt")["input_ids"]
        embeds = model.get_input_embeddings()(ids).requires_grad_(True)
        logits = model(inputs_embeds=embeds, use_cache=False).logits[0, -1]
        target = int(logits.argmax())
        logits[target].backward()
        out.append({"target": target, "relevance": (embeds.grad * embeds).float().sum(-1)[0].tolist()})
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3:])
