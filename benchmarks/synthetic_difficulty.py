"""How hard is the synthetic face dataset? A small CNN on held-out subjects, plus baselines.

Renders a train set and a subject-disjoint test set with `fer_jax.data.synthetic`, trains a
small Flax CNN (conv 32/64/128, 2x2 max pooling by reshape - `nn.max_pool`'s gradient is a slow
select-and-scatter on XLA:CPU, docs/performance.md#max-pool) with Adam, and reports held-out-subject
accuracy, chance level, per-class accuracy and a nearest-class-mean pixel baseline. The dataset
should be learnable (far above chance) but not trivial (clearly below 100%).

Run (about 2-4 minutes on 2 CPU cores):
  .venv/bin/python benchmarks/synthetic_difficulty.py
writes benchmarks/results/synthetic_difficulty.json.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import platform
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from fer_jax.data import synthetic

RESULTS = pathlib.Path(__file__).resolve().parent / "results" / "synthetic_difficulty.json"


def _pool(x):
    """2x2 max pooling by reshape + max (fast gradient on CPU, unlike nn.max_pool)."""
    b, h, w, c = x.shape
    return x[:, : h // 2 * 2, : w // 2 * 2].reshape(b, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


class SmallCNN(nn.Module):
    """conv32-pool-conv64-pool-conv128-pool-dense256-dense(num_classes), ~1.3M parameters."""

    num_classes: int

    @nn.compact
    def __call__(self, x):
        for features in (32, 64, 128):
            x = _pool(nn.relu(nn.Conv(features, (3, 3))(x)))
        x = nn.relu(nn.Dense(256)(x.reshape(x.shape[0], -1)))
        return nn.Dense(self.num_classes)(x)


def _prep(images):
    """uint8 (N, H, W, C) -> float32, standardized per image (removes exposure and contrast)."""
    x = images.astype(np.float32)
    x -= x.mean(axis=(1, 2, 3), keepdims=True)
    return x / (x.std(axis=(1, 2, 3), keepdims=True) + 1.0)


def train_cnn(train, test, num_classes, *, epochs, batch_size, lr, seed):
    """Trains SmallCNN with Adam; returns test predictions and timing."""
    model = SmallCNN(num_classes)
    x_train, y_train = _prep(train.images), train.labels
    params = model.init(jax.random.key(seed), jnp.zeros((1, *x_train.shape[1:])))
    tx = optax.adam(lr)
    opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state, x, y):
        def loss_fn(p):
            logits = model.apply(p, x)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    predict = jax.jit(lambda p, x: model.apply(p, x).argmax(-1))
    rng = np.random.default_rng(seed)
    steps_per_epoch = len(x_train) // batch_size
    t0, losses = time.perf_counter(), []
    for _ in range(epochs):
        order = rng.permutation(len(x_train))
        for i in range(steps_per_epoch):
            idx = order[i * batch_size:(i + 1) * batch_size]
            params, opt_state, loss = step(params, opt_state, x_train[idx], y_train[idx])
        losses.append(float(loss))  # Last batch loss per epoch; syncs once per epoch only.
    train_s = time.perf_counter() - t0
    x_test = _prep(test.images)
    preds = np.concatenate([np.asarray(predict(params, x_test[i:i + 512]))
                            for i in range(0, len(x_test), 512)])
    train_preds = np.concatenate([np.asarray(predict(params, x_train[i:i + 512]))
                                  for i in range(0, len(x_train), 512)])
    return dict(preds=preds, train_acc=float((train_preds == y_train).mean()),
                train_s=train_s, images_per_s=epochs * steps_per_epoch * batch_size / train_s,
                epoch_last_batch_loss=losses)


def nearest_class_mean(train, test, num_classes):
    """Pixel baseline: per-image standardized pixels, nearest class mean (Euclidean)."""
    def feats(images):
        f = images.reshape(len(images), -1).astype(np.float32)
        f -= f.mean(1, keepdims=True)
        return f / (f.std(1, keepdims=True) + 1e-6)
    ftr, fte = feats(train.images), feats(test.images)
    means = np.stack([ftr[train.labels == k].mean(0) for k in range(num_classes)])
    dist = (fte ** 2).sum(1, keepdims=True) - 2 * fte @ means.T + (means ** 2).sum(1)
    return dist.argmin(1)


def per_class(preds, labels, names):
    return {n: float((preds[labels == k] == k).mean()) for k, n in enumerate(names)}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--train_subjects", type=int, default=60)
    p.add_argument("--test_subjects", type=int, default=20)
    p.add_argument("--images_per_class", type=int, default=15)
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=pathlib.Path, default=RESULTS)
    args = p.parse_args()

    t0 = time.perf_counter()
    ds = synthetic.make_dataset(
        num_subjects=args.train_subjects + args.test_subjects, test_subjects=args.test_subjects,
        images_per_class=args.images_per_class, image_size=48, channels=1, seed=args.seed)
    render_s = time.perf_counter() - t0
    train, test, names = ds["train"], ds["test"], ds.class_names
    n_images = len(train) + len(test)
    print(f"rendered {n_images} images in {render_s:.1f} s ({n_images / render_s:.0f} img/s)")

    cnn = train_cnn(train, test, ds.num_classes, epochs=args.epochs, batch_size=args.batch_size,
                    lr=args.lr, seed=args.seed)
    ncm = nearest_class_mean(train, test, ds.num_classes)
    confusion = np.zeros((ds.num_classes, ds.num_classes), np.int64)
    np.add.at(confusion, (test.labels, cnn["preds"]), 1)
    result = dict(
        dataset=dict(image_shape=list(ds.image_shape), classes=list(names),
                     train_subjects=args.train_subjects, test_subjects=args.test_subjects,
                     images_per_class=args.images_per_class, seed=args.seed,
                     train_images=len(train), test_images=len(test)),
        chance=1.0 / ds.num_classes,
        cnn=dict(test_acc=float((cnn["preds"] == test.labels).mean()),
                 train_acc=cnn["train_acc"], per_class=per_class(cnn["preds"], test.labels, names),
                 confusion_rows_true_cols_pred=confusion.tolist(), epochs=args.epochs,
                 batch_size=args.batch_size, lr=args.lr,
                 epoch_last_batch_loss=cnn["epoch_last_batch_loss"],
                 train_s=round(cnn["train_s"], 1), train_images_per_s=round(cnn["images_per_s"])),
        nearest_class_mean=dict(test_acc=float((ncm == test.labels).mean()),
                                per_class=per_class(ncm, test.labels, names)),
        render=dict(seconds=round(render_s, 2), images_per_s=round(n_images / render_s)),
        host=dict(machine=platform.machine(), jax=jax.__version__, backend=jax.default_backend()),
        command="python benchmarks/synthetic_difficulty.py",
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("chance", "cnn", "nearest_class_mean")}, indent=2))


if __name__ == "__main__":
    main()
