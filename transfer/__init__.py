"""ctxenc transfer: evaluate a pretrained trunk on classification, detection, segmentation and retrieval."""
