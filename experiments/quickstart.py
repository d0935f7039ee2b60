"""rljax quickstart (placeholder until the full SFT -> RM -> PPO -> DPO demo lands)."""
import argparse
import json
import os


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--output_dir", default="runs/quickstart")
    p.add_argument("--fast", action="store_true")
    args = p.parse_args()
    import jax
    import jax.numpy as jnp

    import rljax

    os.makedirs(args.output_dir, exist_ok=True)
    x = jnp.arange(8.0)
    summary = {"rljax_version": rljax.__version__, "devices": len(jax.devices()), "sum": float(x.sum())}
    with open(os.path.join(args.output_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
