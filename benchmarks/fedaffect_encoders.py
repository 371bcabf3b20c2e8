r"""FedAffect's encoders on real faces without the few-shot learner (issue 16's diagnostics).

What does an encoder give a few-shot learner to work with? For each encoder (the FedAffect
embedding module's 6x6x64 feature map of a 48x48 face, read `map`, and its global average,
read `pooled`) and for the raw pixels:

- linear probe: multinomial logistic regression on standardised features (full-batch Adam, 500
  steps; L2 weight chosen from 1e-5 / 1e-3 / 1e-1 on the validation split, FER-2013's
  PublicTest), trained on 100% and on 10% of the training split's labels, test accuracy
  (PrivateTest) with a 95% binomial interval;
- nearest centroid: cosine similarity to the class means of all labelled training features;
- K-shot episodes, K = 1 / 5 / 10: the test split cut into 7 random held-out clients (FedAffect's
  FER-2013 protocol, configs/fedaffect.py:data=fer2013), within-client episodes, class prototype =
  the mean of the K support features, nearest prototype by cosine; mean and 95% interval over
  500 episodes.

Encoders (`--encoder`, repeatable): `random` (the config's seed), or NAME=WORKDIR[@SRC] (a run
whose checkpoint holds the encoder: SRC is the checkpoint subtree, 'rep/encoder' for a FedAffect
run, '' for a supervised run of the same small CNN, whose `dense` / `head` are skipped). A
supervised run's own test accuracy (its eval.json) is listed beside it: the classifier the
encoder came from.

  python benchmarks/fedaffect_encoders.py --encoder=random \
      --encoder=simclr=/tmp/fa_fer@rep/encoder --encoder=supervised=/tmp/sup_gn

Writes benchmarks/results/fedaffect_encoders.json (or --out) and a PNG beside it. Needs the raw
FER-2013 csv in ../shared/data/fer2013 (any dataset of configs/fedaffect.py works: --data).
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SHOTS = (1, 5, 10)
L2 = (1e-5, 1e-3, 1e-1)


def parse_encoder(spec: str) -> tuple[str, str, str]:
    """'random' or NAME=WORKDIR[@SRC] -> (name, path, src)."""
    if spec == "random":
        return "random", "", ""
    name, sep, rest = spec.partition("=")
    if not sep or not name or not rest:
        raise ValueError(f"--encoder={spec!r}: expected 'random' or NAME=WORKDIR[@SRC]")
    path, _, src = rest.partition("@")
    return name, path, src


def encoder_variables(config, name: str, path: str, src: str):
    """The encoder's variables: random init, or read from a run's checkpoint."""
    import jax
    import jax.numpy as jnp

    from fer_jax import models
    from fer_jax.io import init as init_lib

    model = models.get_model(config.model.name, num_classes=None, **config.model.kwargs)
    shape = (1, config.data.image_size, config.data.image_size, config.data.channels)
    # The same key FedAffect's representation learner starts its encoder from.
    variables = model.init(jax.random.fold_in(jax.random.PRNGKey(config.seed), 1),
                           jnp.zeros(shape, jnp.float32), train=False)
    if not path:
        return model, variables, None
    variables, report = init_lib.initialize(
        variables, {"path": path, "src": src, "dst": "", "step": 0,
                    "skip": "" if src else "dense|head"})  # A classifier's top is not read.
    print(f"{name}: {len(report.loaded)} leaves loaded from {path}"
          f"{'@' + src if src else ''}", flush=True)
    own = None
    eval_json = pathlib.Path(path) / "eval.json"
    if eval_json.exists():
        ev = json.loads(eval_json.read_text())
        ev = ev.get(config.data.eval_split, ev)  # A supervised run: {'test': {'accuracy'}}.
        own = ev.get("accuracy") if isinstance(ev.get("accuracy"), float) else None
    return model, variables, own


def features(model, variables, images, config, batch_size: int = 256):
    """(maps [N, h*w*c], pooled [N, c]) of uint8 images, eval mode."""
    import jax

    from fer_jax.evaluation.fewshot import batched_maps
    from fer_jax.steps.supervised import preprocess

    @jax.jit
    def fmap(x):
        x = preprocess(x, image_size=config.data.image_size, channels=config.data.channels)
        return model.apply(variables, x, train=False)["feature_map"]

    maps = batched_maps(fmap, images, batch_size)
    return maps.reshape(len(maps), -1), maps.mean((1, 2))


def _interval(acc: float, n: int) -> float:
    return 1.96 * math.sqrt(acc * (1 - acc) / n)


def linear_probe(train_x, train_y, val_x, val_y, test_x, test_y, num_classes: int, *,
                 steps: int = 500) -> dict:
    """Softmax regression on standardised features; L2 picked on the validation split."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    mu, sd = train_x.mean(0), train_x.std(0) + 1e-6
    tx, vx, ex = ((a - mu) / sd for a in (train_x, val_x, test_x))
    tx, ty = jnp.asarray(tx, jnp.float32), jnp.asarray(train_y)

    def fit(l2):
        opt = optax.adam(1e-2)
        w = {"w": jnp.zeros((tx.shape[1], num_classes)), "b": jnp.zeros(num_classes)}

        def loss(w):
            logits = tx @ w["w"] + w["b"]
            ce = optax.softmax_cross_entropy_with_integer_labels(logits, ty).mean()
            return ce + l2 * jnp.sum(w["w"] ** 2)

        def step(carry, _):
            w, s = carry
            g = jax.grad(loss)(w)
            u, s = opt.update(g, s, w)
            return (optax.apply_updates(w, u), s), None

        (w, _), _ = jax.lax.scan(step, (w, opt.init(w)), None, length=steps)
        return w

    fit = jax.jit(fit)
    best = None
    for l2 in L2:
        w = fit(l2)
        val_acc = float(((vx @ np.asarray(w["w"]) + np.asarray(w["b"])).argmax(-1)
                         == val_y).mean())
        if best is None or val_acc > best[0]:
            best = (val_acc, l2, w)
    val_acc, l2, w = best
    acc = float(((ex @ np.asarray(w["w"]) + np.asarray(w["b"])).argmax(-1) == test_y).mean())
    return {"accuracy": acc, "ci95": _interval(acc, len(test_y)), "l2": l2,
            "val_accuracy": val_acc, "train_images": int(len(train_y))}


def _unit(x):
    import numpy as np

    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def nearest_centroid(train_x, train_y, test_x, test_y, num_classes: int) -> dict:
    import numpy as np

    means = np.stack([train_x[train_y == c].mean(0) for c in range(num_classes)])
    pred = (_unit(test_x) @ _unit(means).T).argmax(-1)
    acc = float((pred == test_y).mean())
    return {"accuracy": acc, "ci95": _interval(acc, len(test_y))}


def episodes(held, num_classes: int, shots: int, num_episodes: int, seed: int) -> dict:
    """Within-client K-shot episodes on (features, labels) per held-out client: FedAffect's
    episode evaluation with features as 1x1 maps, prototype = mean support feature, score =
    cosine."""
    import numpy as np

    from fer_jax.evaluation import fewshot as fewshot_eval

    def cosine(protos, maps):  # (E, C, 1, 1, d), (n, 1, 1, d) -> (E, n, C)
        return np.einsum("nd,ecd->enc", _unit(maps[:, 0, 0]), _unit(protos[:, :, 0, 0]))

    held = [(np.asarray(x, np.float32)[:, None, None], y) for x, y in held]
    r = fewshot_eval.evaluate(lambda x: x, cosine, held, num_classes=num_classes, shots=shots,
                              num_episodes=num_episodes, protocol="within_client",
                              batch_size=1024, seed=seed, support_scale=1.0)
    return {k: r[k] for k in ("accuracy", "ci95", "episodes", "chance")}


def evaluate_features(name, kind, f, data, num_classes, args) -> dict:
    import numpy as np

    train_x, val_x, test_x = f
    tr_y, va_y, te_y = data["train_y"], data["val_y"], data["test_y"]
    rng = np.random.default_rng(args.seed)
    tenth = np.sort(rng.permutation(len(tr_y))[:max(num_classes, len(tr_y) // 10)])
    t0 = time.perf_counter()
    row = {"encoder": name, "features": kind, "dim": int(train_x.shape[1])}
    row["linear_probe_100"] = linear_probe(train_x, tr_y, val_x, va_y, test_x, te_y,
                                           num_classes)
    row["linear_probe_10"] = linear_probe(train_x[tenth], tr_y[tenth], val_x, va_y, test_x,
                                          te_y, num_classes)
    row["nearest_centroid"] = nearest_centroid(train_x, tr_y, test_x, te_y, num_classes)
    held = [(test_x[i], te_y[i]) for i in data["held"]]
    row["shots"] = {str(k): episodes(held, num_classes, k, args.episodes, args.seed)
                    for k in SHOTS}
    row["seconds"] = time.perf_counter() - t0
    s = row["shots"]
    print(f"{name:>12s} {kind:>6s} d={row['dim']:5d}  probe 100% "
          f"{row['linear_probe_100']['accuracy']:.3f}  10% {row['linear_probe_10']['accuracy']:.3f}"
          f"  NC {row['nearest_centroid']['accuracy']:.3f}  1/5/10-shot "
          + " / ".join(f"{s[str(k)]['accuracy']:.3f}" for k in SHOTS), flush=True)
    return row


def plot(result, path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(13, 4.8))
    for r in rows:
        ys = [r["shots"][str(k)]["accuracy"] for k in SHOTS]
        es = [r["shots"][str(k)]["ci95"] for k in SHOTS]
        a.errorbar(SHOTS, ys, yerr=es, marker="o", capsize=3,
                   label=f"{r['encoder']} ({r['features']})")
    chance = rows[0]["shots"]["1"]["chance"]
    a.axhline(chance, color="gray", ls=":", label=f"chance {chance:.3f}")
    a.set(xlabel="shots K (supports per class)", ylabel="episode accuracy (95% interval)",
          xticks=SHOTS, title=f"K-shot episodes on {result['held_out_clients']} held-out "
          f"clients (cosine to prototypes)")
    a.legend(fontsize=7)
    labels = [f"{r['encoder']}\n{r['features']}" for r in rows]
    x = range(len(rows))
    w = 0.27
    for j, (key, lab) in enumerate((("linear_probe_100", "linear probe, 100% labels"),
                                    ("linear_probe_10", "linear probe, 10% labels"),
                                    ("nearest_centroid", "nearest centroid (cosine)"))):
        b.bar([i + (j - 1) * w for i in x], [r[key]["accuracy"] for r in rows], w,
              yerr=[r[key]["ci95"] for r in rows], capsize=2, label=lab)
    b.axhline(result["majority"], color="k", ls="--", lw=1,
              label=f"majority class {result['majority']:.3f}")
    b.axhline(1 / result["num_classes"], color="gray", ls=":",
              label=f"chance {1 / result['num_classes']:.3f}")
    label = "the supervised classifier itself"  # One legend entry for all such rows.
    for i, r in enumerate(rows):
        if r.get("own_accuracy") is not None:
            b.plot([i - 1.5 * w, i + 1.5 * w], [r["own_accuracy"]] * 2, color="crimson", lw=2,
                   label=label)
            label = None
    b.set_xticks(list(x), labels, fontsize=7)
    b.set(ylabel=f"{result['test_split']} accuracy (95% interval)",
          title=f"{result['data']}: probes of the encoder's features")
    b.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--encoder", action="append", default=None,
                   help="random | NAME=WORKDIR[@SRC] (repeatable; default: random)")
    p.add_argument("--data", default="fer2013", help="configs/fedaffect.py data= argument")
    p.add_argument("--no_pixels", action="store_true", help="skip the raw-pixel baseline")
    p.add_argument("--episodes", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" /
                                        "fedaffect_encoders.json"))
    args = p.parse_args(argv)

    import numpy as np

    from configs import fedaffect as fa_config
    from fer_jax import data as data_lib
    from fer_jax.data import partition as partition_lib

    config = fa_config.get_config(f"data={args.data}")
    config.seed = args.seed
    dataset = data_lib.load(config.data)
    c = dataset.num_classes
    train, test = dataset[config.data.train_split], dataset[config.data.eval_split]
    val_name = config.data.get("val_split") or "validation"
    val = dataset[val_name] if val_name in dataset.splits else test
    held = partition_lib.iid(len(test), config.fedaffect.num_heldout_clients or 7,
                             seed=config.seed).client_indices
    data = {"train_y": np.asarray(train.labels), "val_y": np.asarray(val.labels),
            "test_y": np.asarray(test.labels), "held": held}
    result = {"data": dataset.name, "num_classes": c, "class_names": list(dataset.class_names),
              "train_images": len(train), "test_split": config.data.eval_split,
              "val_split": val_name if val is not test else config.data.eval_split,
              "held_out_clients": len(held), "episodes": args.episodes, "seed": args.seed,
              "majority": float(np.bincount(data["test_y"], minlength=c).max()
                                / len(data["test_y"])),
              "encoder_model": {"name": config.model.name, **config.model.kwargs.to_dict()},
              "rows": []}
    print(f"{dataset.name}: {len(train)} train, {len(val)} {result['val_split']}, {len(test)} "
          f"{config.data.eval_split} images, {c} classes, majority {result['majority']:.3f}",
          flush=True)
    if not args.no_pixels:
        pix = [s.images.reshape(len(s), -1).astype(np.float32) / 255 for s in (train, val, test)]
        result["rows"].append(evaluate_features("pixels", "raw", pix, data, c, args))
    for spec in args.encoder or ["random"]:
        name, path, src = parse_encoder(spec)
        model, variables, own = encoder_variables(config, name, path, src)
        t0 = time.perf_counter()
        feats = [features(model, variables, s.images, config) for s in (train, val, test)]
        secs = time.perf_counter() - t0
        for k, kind in enumerate(("map", "pooled")):
            row = evaluate_features(name, kind, [f[k] for f in feats], data, c, args)
            row.update(source=path, src=src, own_accuracy=own, feature_seconds=secs)
            result["rows"].append(row)
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    plot(result, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return result


if __name__ == "__main__":
    main()
