"""Run by tests/test_mesh.py in a process of its own: the CPU backend needs its device count
before it starts, and the rest of the suite assumes one device.

    python tests/mesh_worker.py CHECKPOINT_DIR   -> one JSON line: each case's tokens and stats
"""

import json
import sys

import jax

jax.config.update("jax_num_cpu_devices", 4)

import jax.numpy as jnp
import numpy as np

import dynaexq_jax as dx
from dynaexq_jax.eval import evaluate
from dynaexq_jax.runtime import mesh as mesh_lib
from dynaexq_jax.runtime.scheduler import Scheduler, Sequence

NEW = 12


def main(path: str) -> None:
    ckpt = dx.load(path, jnp.float32)
    enc = lambda t: ckpt.tokenizer.encode(t).ids
    batch = [enc("def f(x):"), enc("the quick brown fox")]
    single = [enc("return x + 1")]
    shape = dict(batch=2, longest_prompt=16, max_new_tokens=NEW)
    # int8 fallbacks and int8 slots hold the same values: the tokens cannot depend on which
    # experts are resident, so a swap that wrote a wrong slot, device or handle shows.
    swapping = dx.DynaExqOptions(lo_bits=8, hi_dtype="int8", save_profile=False, rebalance_every=1,
                                 half_life_steps=2.0, hysteresis=0.0)
    plain = dx.DynaExqOptions(save_profile=False)
    out = {}

    L, E = len(ckpt.config.moe_layers), ckpt.config.num_experts
    skewed = np.random.default_rng(0).zipf(1.5, size=(L, E)).astype(float)  # a profile's expected load

    def run(name, policy, opts, devices, budget=None, one_prompt=False, balanced=False):
        mesh = mesh_lib.expert_mesh(devices) if devices > 1 else None
        placement = mesh_lib.Placement.balanced(skewed, devices) if balanced else None
        eng, plan = dx.build_engine(ckpt, policy, budget=budget, opts=opts, mesh=mesh, placement=placement, **shape)
        gen = eng.generate(batch, NEW)
        one = eng.generate(single, NEW) if one_prompt else gen
        out[name] = dict(batch=gen.tokens, single=one.tokens if one_prompt else None, slots=plan.slots,
                         total=plan.total, budget=budget, promotions=gen.stats["promotions"],
                         demotions=gen.stats["demotions"], hi_hit_rate=gen.stats["hi_hit_rate"],
                         contiguous=placement is None or bool(
                             (placement.experts == mesh_lib.Placement.contiguous(L, E, devices).experts).all()),
                         collective_bytes={k[0]: mesh_lib.collective_bytes(c.as_text())
                                           for k, c in eng._compiled.items() if k[0] == "decode" and mesh is not None})
        return eng

    # Each run compiles its steps (~5 s of a CPU core per shape): the single prompt (a batch bucket
    # of its own) runs where it checks most, dynaexq with swaps on 4 devices.
    run("full/1", "full", plain, 1)
    on_two = run("full/2", "full", plain, 2)
    # The server's continuous batching on the mesh: each prompt joins a row of its own.
    sch = Scheduler(on_two, max_batch=2, context=64, max_chunk=16, eos_token_ids=()).start()
    seqs = [sch.submit(Sequence(ids, NEW)) for ids in batch]
    assert all(s.done.wait(300) for s in seqs)
    sch.close(30)
    out["served/2"] = [s.tokens for s in seqs]
    run("dynaexq/4", "dynaexq", plain, 4, balanced=True)  # room for every expert: full's tokens
    run("static/1", "static", swapping, 1, one_prompt=True)  # int8: what the swapping runs compute, whatever moves
    run("static/4", "static", swapping, 4)
    for devices in (2, 4):
        floor = dx.plan_for(ckpt.config, "dynaexq", budget=None, dtype_itemsize=4, opts=swapping, devices=devices,
                            **shape)
        run(f"swapping/{devices}", "dynaexq", swapping, devices, budget=floor.budget_for(2),
            one_prompt=devices == 4, balanced=devices == 2)
    # scripts/eval.py's evaluation on the mesh: one device's perplexities, swaps settled between passes.
    docs = ["def f(x):\n    return x + 1\n", "the quick brown fox jumps over the lazy dog"]
    task = evaluate.Task("ppl", "docs", docs)
    for devices in (1, 2):
        runs = [evaluate.RunSpec("full", "none", 4), evaluate.RunSpec("dynaexq", "+25%", 8)]
        results = evaluate.evaluate_runs(ckpt, runs, [task], opts=swapping, batch_size=2, window=16,
                                         calibration=["for i in range(10):\n    print(i)\n"],
                                         mesh=mesh_lib.expert_mesh(devices) if devices > 1 else None)
        out[f"eval/{devices}"] = {r.policy: r.value for r in results if r.metric == "ppl"}
    print(json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1])
