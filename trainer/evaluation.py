"""Evaluation: run a model over encoded documents, aggregate a confusion matrix across ranks, derive metrics.

Every rank walks the same number of batches (some possibly empty), because row-wise sharded tables need every
rank in every lookup collective.
"""

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from trainer.batch import collate
from trainer.data import BatchPlan, rank_share
from trainer.distributed import DistInfo, all_reduce_
from trainer.features import EncodedDocs


@torch.no_grad()
def predict_logits(
    model: nn.Module, docs: EncodedDocs, num_pretrained: int, token_level: bool, info: DistInfo, batch_size: int = 1024
) -> tuple[np.ndarray, np.ndarray]:
    """Logits for this rank's share of `docs` (in order) and the document indices they belong to."""
    was_training = model.training
    model.eval()
    plan = BatchPlan(docs.raw_tokens, batch_size * info.world_size, 0, seed=0, shuffle=False)
    outs, rows_all = [], []
    for global_batch in plan.epoch(0):
        rows = rank_share(global_batch, info.rank, info.world_size)
        batch = collate(docs, rows, num_pretrained, token_level).to(info.device)
        outs.append(model(batch).float().cpu())
        rows_all.append(rows)
    model.train(was_training)
    if not outs:
        return np.zeros((0, 0), dtype=np.float32), np.zeros(0, dtype=np.int64)
    return torch.cat(outs).numpy(), np.concatenate(rows_all)


class EvalTotals:
    """What `evaluate` adds up, over any number of parts of a data set: the confusion matrix, the predictions for
    documents of labels unseen in training, and the loss sum and count. The metrics of the parts together are
    the metrics of the whole (the loss up to float rounding: it is summed in float64 part by part)."""

    def __init__(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.reset()

    def reset(self) -> None:
        self.confusion = np.zeros((self.num_classes, self.num_classes), dtype=np.float64)
        self.unseen_pred = np.zeros(self.num_classes, dtype=np.float64)
        self.loss_sum = np.zeros(2, dtype=np.float64)  # [sum of losses, count] over known labels

    def add(self, model: nn.Module, docs: EncodedDocs, num_pretrained: int, token_level: bool, info: DistInfo) -> None:
        """This rank's share of `docs`."""
        logits, rows = predict_logits(model, docs, num_pretrained, token_level, info)
        if not len(rows):
            return
        labels = np.asarray(docs.labels[rows])
        pred = logits.argmax(1)
        known = labels >= 0
        np.add.at(self.confusion, (labels[known], pred[known]), 1)
        np.add.at(self.unseen_pred, pred[~known], 1)
        if known.any():
            losses = F.cross_entropy(torch.from_numpy(logits[known]), torch.from_numpy(labels[known]), reduction="none")
            self.loss_sum += (float(losses.sum()), float(known.sum()))

    def metrics(self, info: DistInfo) -> dict:
        """Accuracy, macro F1, loss and the confusion matrix over every rank's totals."""
        packed = torch.from_numpy(np.concatenate([self.confusion.ravel(), self.unseen_pred, self.loss_sum]))
        if info.backend == "nccl":
            packed = packed.to(info.device)
        all_reduce_(packed, info)
        packed = packed.cpu().numpy()
        k = self.num_classes
        confusion = packed[: k * k].reshape(k, k)
        unseen_pred, loss_sum = packed[k * k : -2], packed[-2:]
        # no document with a known label: no loss to report (null in JSON), not a perfect 0
        loss = float(loss_sum[0] / loss_sum[1]) if loss_sum[1] else None
        return metrics_from_confusion(confusion, unseen_pred) | {"loss": loss}


def evaluate(
    model: nn.Module, docs: EncodedDocs, num_pretrained: int, token_level: bool, num_classes: int, info: DistInfo,
) -> dict:
    """Accuracy, macro F1, loss and the confusion matrix over all ranks' shares. Documents whose label was never
    seen in training (label -1) are counted as errors, and their predictions as false positives of the predicted
    class. The loss is the plain cross-entropy over documents with known labels (not class-weighted: the
    held-out figure means the same whatever train.class_weights is)."""
    totals = EvalTotals(num_classes)
    totals.add(model, docs, num_pretrained, token_level, info)
    return totals.metrics(info)


def metrics_from_confusion(confusion: np.ndarray, unseen_pred: np.ndarray | None = None) -> dict:
    """Rows are true labels, columns predictions. `unseen_pred[c]`: documents whose label was never seen in
    training that were predicted as class c; they have no row, so they are all wrong, and false positives of c.

    Macro F1 averages over the classes that occur in the labels or in the predictions (sklearn's
    `f1_score(average="macro")` over those labels): a class predicted but absent from the data scores 0."""
    unseen_pred = np.zeros(confusion.shape[0]) if unseen_pred is None else np.asarray(unseen_pred, np.float64)
    tp = np.diag(confusion)
    true_n = confusion.sum(1)
    pred_n = confusion.sum(0) + unseen_pred
    unseen = unseen_pred.sum()
    n = confusion.sum() + unseen
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = np.where(pred_n > 0, tp / pred_n, 0.0)
        recall = np.where(true_n > 0, tp / true_n, 0.0)
        f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
    present = (true_n > 0) | (pred_n > 0)
    return {
        "accuracy": float(tp.sum() / n) if n else 0.0,
        "macro_f1": float(f1[present].mean()) if present.any() else 0.0,
        "n": int(n),
        "unseen_label_docs": int(unseen),
        "per_class": {"precision": precision.tolist(), "recall": recall.tolist(), "f1": f1.tolist(),
                      "support": true_n.astype(int).tolist()},
        "confusion": confusion.astype(int).tolist(),
    }


def per_class_table(metrics: dict, labels: list[str]) -> str:
    pc = metrics["per_class"]
    width = max([len(x) for x in labels] + [5])
    lines = [f"{'label':<{width}}  precision  recall     f1  support"]
    for i, name in enumerate(labels):
        lines.append(f"{name:<{width}}  {pc['precision'][i]:9.3f}  {pc['recall'][i]:6.3f}  {pc['f1'][i]:5.3f}  "
                     f"{pc['support'][i]:7d}")
    lines.append(f"{'all':<{width}}  accuracy {metrics['accuracy']:.4f}  macro_f1 {metrics['macro_f1']:.4f}  "
                 f"n {metrics['n']}")
    return "\n".join(lines)


def confusion_image(confusion: np.ndarray, cell: int = 8) -> np.ndarray:
    """Row-normalised confusion matrix as an RGB heat map (H, W, 3) uint8, no plotting library needed."""
    rows = confusion.sum(1, keepdims=True)
    norm = np.divide(confusion, rows, out=np.zeros_like(confusion, dtype=np.float64), where=rows > 0)
    heat = (255 * (1 - norm)).astype(np.uint8)
    image = np.stack([heat, heat, np.full_like(heat, 255)], axis=-1)
    return np.kron(image, np.ones((cell, cell, 1), dtype=np.uint8))
