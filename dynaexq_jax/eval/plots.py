"""The benchmark's figures (matplotlib: the optional `bench` extra), marked as the tool's own
PNGs (`io.files.png_metadata`) so a later run may write them again."""

from __future__ import annotations

from dynaexq_jax.io import files


def throughput(results, path, device) -> None:
    """Decode tokens/s by batch size, a line per policy; rows of a big-little sweep: speed
    against quality instead (`big_little`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if any(r["little_share"] is not None for r in results):
        return big_little(results, path, device, plt)
    fig, ax = plt.subplots(figsize=(6, 4))
    for policy in dict.fromkeys(r["policy"] for r in results):
        rs = [r for r in results if r["policy"] == policy]
        ax.plot([r["batch_size"] for r in rs], [r["decode_tokens_per_s"] or 0 for r in rs], marker="o", label=policy)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch size")
    ax.set_ylabel("decode tokens/s")
    ax.set_title(f"decode throughput by policy ({device})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, metadata=files.png_metadata())


def big_little(results, path, device, plt) -> None:
    """Speed against quality: decode tokens/s against KL vs the reference, one line per policy
    and batch size through its little shares."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for key in dict.fromkeys((r["policy"].split(" little ")[0], r["batch_size"]) for r in results):
        rs = [r for r in results if (r["policy"].split(" little ")[0], r["batch_size"]) == key
              and r["kl_vs_full"] is not None]
        ax.plot([r["kl_vs_full"] for r in rs], [r["decode_tokens_per_s"] or 0 for r in rs], marker="o",
                label=f"{key[0]} B={key[1]}")
    ax.set_xlabel("KL vs reference (nats/token)")
    ax.set_ylabel("decode tokens/s")
    ax.set_title(f"big-little: speed against quality ({device})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, metadata=files.png_metadata())
