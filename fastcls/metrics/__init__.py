"Metrics: long-tail (balanced accuracy, per-class recall, shot groups) and retrieval (Recall@K, mAP@R)"
