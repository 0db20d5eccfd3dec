"""How much of the embedded dataset a classifier of time-summed event counts can solve.

    ./dev run python -m benchmarks.count_baseline [--config FILE|PRESET] [--set key=value ...]

It builds the same train and test splits as `threefactor train` (same config, same seeds),
sums every recording's events over time into a 2 x 32 x 32 count image, and fits a
logistic regression and a small MLP (scikit-learn) on them. The embedded dataset is made so
that this scores at most about 50 % (see docs/decolle.md); the spiking network must use time.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np


def main(argv: list[str] | None = None) -> dict:
    from sklearn.linear_model import LogisticRegression
    from sklearn.neural_network import MLPClassifier
    from sklearn.preprocessing import StandardScaler

    from threefactor.config import load_config
    from threefactor.run.from_config import load_data

    parser = argparse.ArgumentParser(prog="python -m benchmarks.count_baseline")
    parser.add_argument("--config")
    parser.add_argument("--set", action="append", default=[])
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.set)
    t0 = time.perf_counter()
    train, test = load_data(cfg)

    def counts(data) -> np.ndarray:
        return data.frames.float().sum(1).flatten(1).numpy()

    scaler = StandardScaler().fit(counts(train))
    xtr, xte = scaler.transform(counts(train)), scaler.transform(counts(test))
    ytr, yte = train.labels.numpy(), test.labels.numpy()
    results = {}
    for c in (0.01, 0.1, 1.0):
        clf = LogisticRegression(C=c, max_iter=3000).fit(xtr, ytr)
        results[f"logistic_regression_C{c}"] = float(clf.score(xte, yte))
    mlp = MLPClassifier((256,), max_iter=500, random_state=0).fit(xtr, ytr)
    results["mlp_256"] = float(mlp.score(xte, yte))
    results["chance"] = 1.0 / len(train.classes)
    results["n_train"], results["n_test"] = len(ytr), len(yte)
    results["time_s"] = time.perf_counter() - t0
    print(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
