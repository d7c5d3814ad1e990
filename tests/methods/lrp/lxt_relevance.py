"""Relevance of LXT 2.1's efficient AttnLRP / CP-LRP, one text at a time (LXT's usage), as JSON on stdout.

Run in its own process: LXT patches `transformers` module globals. Usage:
    python tests/methods/lrp/lxt_relevance.py RULE MODEL TEXT [TEXT ...]
MODEL: an int (the seed of the tiny test Llama) or "smollm2". The JSON holds each text's target and
relevance and `seconds`: the loop over the texts, timed after one warm-up text (for the benchmark).

Two workarounds for LXT 2.1 on transformers 5.x, both outside the rules being compared:
- `import lxt.efficient` imports every model file LXT ships; its BERT file imports
  `find_pruneable_heads_and_indices` (removed from transformers) and its ViT file needs torchvision.
  Those two submodules are replaced by empty stand-ins (neither is used for Llama).
- LXT's AttnLRP `patch_attention` replaces `modeling_llama.ALL_ATTENTION_FUNCTIONS` with a plain dict,
  which has no `get_interface` (transformers 5 calls it). The registry object is put back, holding
  LXT's wrapped functions (what its CP-LRP patch does in place), so eager and SDPA both run LXT's rule.
"""

import json
import sys
import time
import types
from pathlib import Path

# the engine first: its check that `import kernels` is this project's package must run before tests/ (which
# holds a `kernels` folder of tests, a namespace package) is on sys.path
from engine import load_model  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

for name in ("bert", "vit_torch"):
    stand_in = types.ModuleType(f"lxt.efficient.models.{name}")
    stand_in.modeling_bert = types.ModuleType("unused_bert")
    stand_in.vision_transformer = types.ModuleType("unused_vit")
    stand_in.attnLRP = stand_in.cp_LRP = {}
    sys.modules[f"lxt.efficient.models.{name}"] = stand_in

import lxt.efficient.models.llama as lxt_llama  # noqa: E402
from conftest import make_tokenizer, tiny_llama  # noqa: E402
from lxt.efficient import monkey_patch  # noqa: E402
from transformers.models.llama import modeling_llama  # noqa: E402


def _relevance(model, tokenizer, text: str) -> dict:
    ids = tokenizer(text, return_tensors="pt")["input_ids"]
    embeds = model.get_input_embeddings()(ids).requires_grad_(True)
    logits = model(inputs_embeds=embeds, use_cache=False).logits[0, -1]
    target = int(logits.argmax())
    logits[target].backward()
    return {"target": target, "relevance": (embeds.grad * embeds).float().sum(-1)[0].tolist()}


def main(rule: str, which: str, texts: list[str]) -> None:
    registry = modeling_llama.ALL_ATTENTION_FUNCTIONS
    monkey_patch(modeling_llama, lxt_llama.attnLRP if rule == "attnlrp" else lxt_llama.cp_LRP)
    for name, wrapped in dict(modeling_llama.ALL_ATTENTION_FUNCTIONS).items():
        registry[name] = wrapped
    modeling_llama.ALL_ATTENTION_FUNCTIONS = registry
    if which == "smollm2":
        torch.set_num_threads(2)
        model, tokenizer = load_model("smollm2")
    else:
        model, tokenizer = tiny_llama(int(which)), make_tokenizer()
    for p in model.parameters():
        p.requires_grad_(False)
    _relevance(model, tokenizer, texts[0])  # warm-up
    start = time.perf_counter()
    out = [_relevance(model, tokenizer, text) for text in texts]
    json.dump({"seconds": time.perf_counter() - start, "texts": out}, sys.stdout)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
