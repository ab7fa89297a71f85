"""Classifiers of images into class sources (the class-ablation control labels its samples with
one): scikit-learn's, or a small PyTorch CNN behind the same calls."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from experiments.configs import CLASSIFIERS, ClassifierKind  # noqa: F401 - re-exported


class SmallCNN(torch.nn.Module):
    """Three 3x3 convolutions (the last two stride 2), global average pooling, a linear head.

    (B, C, H, W) in [-1, 1] -> (B, S) logits; any H, W >= 4 (8x8 digits, 28x28 MNIST).
    """

    def __init__(self, channels: int, num_classes: int, width: int = 32) -> None:
        super().__init__()
        nn = torch.nn
        self.features = nn.Sequential(
            nn.Conv2d(channels, width, 3, padding=1), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(2 * width, 2 * width, 3, stride=2, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(2 * width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


class _CNNModel:
    """SmallCNN behind the scikit-learn calls Classifier uses (flattened features in)."""

    def __init__(self, shape: tuple[int, int, int], num_classes: int, *, epochs: int, seed: int) -> None:
        self.shape, self.epochs, self.seed = shape, epochs, seed
        self.classes_ = np.arange(num_classes)
        with torch.random.fork_rng(devices=[]):  # seeded init without touching the global RNG
            torch.manual_seed(seed)
            self.net = SmallCNN(shape[0], num_classes)

    def _images(self, feats: np.ndarray) -> Tensor:
        return torch.from_numpy(np.ascontiguousarray(feats, np.float32)).reshape(-1, *self.shape)

    def fit(self, feats: np.ndarray, y: np.ndarray) -> _CNNModel:
        """Adam, minibatches of 64 shuffled by a torch.Generator(seed), ``epochs`` passes."""
        x, t = self._images(feats), torch.from_numpy(np.asarray(y, np.int64))
        opt = torch.optim.Adam(self.net.parameters(), lr=2e-3)
        g = torch.Generator().manual_seed(self.seed)
        self.net.train()
        for _ in range(self.epochs):
            for idx in torch.randperm(len(x), generator=g).split(64):
                loss = torch.nn.functional.cross_entropy(self.net(x[idx]), t[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        self.net.eval()
        return self

    @torch.no_grad()
    def predict_proba(self, feats: np.ndarray) -> np.ndarray:
        x = self._images(feats)
        return torch.cat([torch.softmax(self.net(c), dim=1) for c in x.split(1024)]).numpy()

    def predict(self, feats: np.ndarray) -> np.ndarray:
        return self.predict_proba(feats).argmax(1)


@dataclass
class Classifier:
    """A classifier of images into source indices (class granularity): scikit-learn's, or
    SmallCNN behind the same calls.

    accuracy is measured on a stratified held-out split never used for fitting.
    """

    model: Any
    kind: str
    accuracy: float
    n_train: int
    n_test: int

    def predict_proba(self, x: Tensor) -> np.ndarray:
        """x: (B, C, H, W) in [-1, 1] -> (B, S) class probabilities."""
        feats = x.detach().float().cpu().flatten(1).numpy()
        return np.asarray(self.model.predict_proba(feats))


def train_classifier(x: Tensor, y: np.ndarray, *, kind: str = "svc", test_fraction: float = 0.2,
                     seed: int = 0, cnn_epochs: int = 30) -> Classifier:
    """Fit a classifier on a stratified (1 - test_fraction) split of (x (N, C, H, W), y (N,)).

    kind: "svc" (RBF SVM with Platt-scaled probabilities, calibrated by 5-fold
    cross-validation), "logreg", "mlp" or "cnn" (SmallCNN, ``cnn_epochs`` passes of Adam).
    Classes must be 0..S-1 (source indices) and every class must appear in the training split.
    """
    from sklearn.calibration import CalibratedClassifierCV
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split
    from sklearn.neural_network import MLPClassifier
    from sklearn.svm import SVC

    if kind not in CLASSIFIERS:
        raise ValueError(f"classifier must be one of {CLASSIFIERS}, not {kind!r}")
    feats = x.detach().float().cpu().flatten(1).numpy()
    y = np.asarray(y, np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(feats, y, test_size=test_fraction, stratify=y,
                                              random_state=seed)
    if kind == "svc":
        model: Any = CalibratedClassifierCV(SVC(C=10.0, gamma="scale"), method="sigmoid", cv=5,
                                            ensemble=False)
    elif kind == "logreg":
        model = LogisticRegression(C=1.0, max_iter=2000)
    elif kind == "cnn":
        C, H, W = x.shape[1:]
        model = _CNNModel((C, H, W), int(y.max()) + 1, epochs=cnn_epochs, seed=seed)
    else:
        model = MLPClassifier(hidden_layer_sizes=(256,), max_iter=300, early_stopping=True,
                              random_state=seed)
    model.fit(x_tr, y_tr)
    if not np.array_equal(np.asarray(model.classes_), np.arange(int(y.max()) + 1)):
        raise ValueError("every class must appear in the classifier's training split")
    acc = float((model.predict(x_te) == y_te).mean())
    return Classifier(model, kind, acc, len(y_tr), len(y_te))
