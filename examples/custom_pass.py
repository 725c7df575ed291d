"""Write your own graph pass and run it in the pipeline.

    python examples/custom_pass.py

The pass below counts the matrix multiplies of the joint forward+backward
graph and records each one's FLOPs on the node (``node.meta["ufx"].notes``).
It is registered with ``@graph_pass`` and named in the pipeline string
``"default,+count_matmul_flops"``; its stats show in the dump's
``pass_stats.json`` and at the head of its graph file.
"""

import json
import math
import os

import torch

from unsloth_fx import PassResult, graph_pass, ufx
from unsloth_fx.zoo import build_model

MATMULS = {torch.ops.aten.mm.default, torch.ops.aten.bmm.default, torch.ops.aten.addmm.default}


@graph_pass(name="count_matmul_flops", stage="joint", options={"min_gflop": 0.0})
def count_matmul_flops(gm, ctx, min_gflop):
    """Annotate every matmul with its FLOPs; report the total. Idempotent: nodes already annotated are skipped."""
    total, changed = 0, False
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target not in MATMULS:
            continue
        a, b = (x.meta["val"] for x in node.args[-2:])
        flops = 2 * math.prod(a.shape) * b.shape[-1]
        total += flops
        if flops / 1e9 >= min_gflop and "flops" not in ufx(node).notes:
            ufx(node).notes["flops"] = int(flops)
            changed = True
    return PassResult(gm, changed, {"matmuls_gflop": round(total / 1e9, 6)})


def main():
    model = build_model("tiny-qwen2", device="cpu", dtype=torch.float32)
    model.config.use_cache = False
    dump = "ufx_dump_custom_pass"
    compiled = torch.compile(
        model, backend="unsloth", options={"lower": "eager", "dump": dump, "pipeline": "default,+count_matmul_flops"}
    )
    ids = torch.randint(0, model.config.vocab_size, (2, 32))
    loss = compiled(input_ids=ids, labels=ids).loss
    loss.backward()
    from unsloth_fx.backend import LAST

    graph_dir = LAST["dump_dir"]
    stats = json.load(open(os.path.join(graph_dir, "pass_stats.json")))
    print(f"loss {loss.item():.4f}")
    print(f"count_matmul_flops stats: {stats['joint']['count_matmul_flops']}")
    mine = sorted(f for f in os.listdir(graph_dir) if f.endswith("count_matmul_flops.py"))[0]
    print(f"its graph: {os.path.join(graph_dir, mine)}")
    print(open(os.path.join(graph_dir, mine)).readline().rstrip())


if __name__ == "__main__":
    main()
