#!/usr/bin/env python
"""Train the packaged demo model ``fmnist:cnn`` from scratch on Fashion-MNIST.

Writes ``compresscnn/assets/fmnist_cnn.safetensors`` (fp32, < 1 MB) with the measured test
accuracy, the date and the command in the safetensors metadata, so ``load_model("fmnist:cnn",
"DEFAULT")`` reports where its figure came from. Data: the idx files of Debian's
``dataset-fashion-mnist`` (``/usr/share/datasets/fashion-mnist``) or ``--root``.

    python tools/train_demo_model.py            # 3 epochs, about 3 minutes on 1 CPU thread
"""

from __future__ import annotations

import argparse
import datetime as dt
import shlex
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from compresscnn import load_model, make_loaders

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "compresscnn" / "assets" / "fmnist_cnn.safetensors"


@torch.no_grad()
def accuracy(model: torch.nn.Module, loader) -> float:
    model.eval()
    correct = total = 0
    for x, y in loader:
        correct += int((model(x).argmax(1) == y).sum())
        total += len(y)
    return 100.0 * correct / total


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", default=None, help="folder with the Fashion-MNIST idx .gz files")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=3e-3, help="peak Adam learning rate (one-cycle)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model = load_model("fmnist:cnn")  # random init, carries pretrained_cfg (mean/std)
    data_cfg = {"dataset": "fashion_mnist", "root": args.root, "batch_size": args.batch_size,
                "eval_batch_size": 1000, "seed": args.seed, "augment": False}
    train_loader, test_loader = make_loaders(data_cfg, model.pretrained_cfg)

    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=args.lr, total_steps=args.epochs * len(train_loader), pct_start=0.2)
    t0 = time.time()
    for epoch in range(args.epochs):
        model.train()
        seen, loss_sum = 0, 0.0
        for x, y in train_loader:
            loss = F.cross_entropy(model(x), y, label_smoothing=0.05)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            seen += len(y)
            loss_sum += loss.item() * len(y)
        print(f"epoch {epoch + 1}/{args.epochs}: train loss {loss_sum / seen:.4f} "
              f"({time.time() - t0:.0f} s)", flush=True)
    train_s = time.time() - t0
    acc = accuracy(model, test_loader)
    print(f"test accuracy {acc:.2f}% on {len(test_loader.dataset)} images; "
          f"training {train_s:.0f} s", flush=True)

    from safetensors.torch import save_file

    command = "python " + " ".join(shlex.quote(a) for a in
                                   ["tools/train_demo_model.py", *(sys.argv[1:] if argv is None else argv)])
    metadata = {
        "spec": "fmnist:cnn",
        "dataset": "Fashion-MNIST",
        "acc@1": f"{acc:.2f}",
        "test_images": str(len(test_loader.dataset)),
        "epochs": str(args.epochs),
        "seed": str(args.seed),
        "train_seconds": f"{train_s:.0f}",
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "command": command,
        "torch": torch.__version__,
    }
    sd = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    save_file(sd, str(tmp), metadata=metadata)
    tmp.replace(args.out)  # nothing half-written
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.2f} MB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
